"""The demo's main command: build the task, run `axolotl train` with SELFEE on it, and report each round."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import yaml

from selfee_plugin import metric_keys as keys

# Demo hyperparameters, fixed before any result was seen except the learning rate (benchmarks/README.md).
DEMO_CONFIG = {
    "tokenizer_type": "AutoTokenizer",
    "chat_template": "tokenizer_default",
    "rl": "dpo",
    "rl_beta": 0.1,
    "adapter": "lora",
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_linear": True,
    "sequence_len": 64,
    "micro_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "num_epochs": 3,
    "learning_rate": 5e-4,  # 2e-3 (the first choice) collapsed round 1: see benchmarks/README.md
    "optimizer": "adamw_torch",
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.1,
    "bf16": False,
    "fp16": False,
    "logging_steps": 5,
    "save_strategy": "no",
    "dataloader_num_workers": 0,
    "dataset_num_proc": 1,
    "plugins": ["selfee_plugin.SelfeePlugin"],
}
SELFEE_BLOCK = {
    "rounds": [400, 800],
    "samples_per_prompt": 2,
    "generation": {"max_new_tokens": 12, "temperature": 0.7, "top_p": 1.0, "batch_size": 64},
    "judge": {"batch_tokens": 2048},
    "seed_epochs": 3,
    "round_epochs": 1,
}


def data_dir_for(out: str, task: str) -> str:
    """Where a task's build is cached under `out`: `data` (fixed, as before the variable mode) or `data_<task>`."""
    return os.path.join(out, "data" if task == "fixed" else f"data_{task}")


def write_config(paths: dict, out_dir: str, seed: int = 0, selfee: dict | None = None, **overrides) -> str:
    """An Axolotl YAML for the demo: the built SFT model, its seed pairs, prompt pool and eval pairs."""
    block = json.loads(json.dumps(SELFEE_BLOCK))
    block["prompts"] = [{"path": paths["prompts"], "ds_type": "json", "type": "prompt"}]
    block["judge"]["eval_pairs"] = {"path": paths["eval_pairs"], "ds_type": "json", "type": "chat_template.default"}
    block["shuffle_seed"] = seed
    block["generation"]["seed"] = seed
    for key, value in (selfee or {}).items():
        block[key] = {**block[key], **value} if isinstance(value, dict) and isinstance(block.get(key), dict) else value
    cfg = {
        **DEMO_CONFIG,
        "base_model": paths["sft_model"],
        "datasets": [{"path": paths["seed"], "ds_type": "json", "split": "train", "type": "chat_template.default"}],
        "output_dir": out_dir,
        "dataset_prepared_path": os.path.join(out_dir, "prepared"),
        "seed": seed,
        "selfee": block,
        **overrides,
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "config.yml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def train(config_path: str, log_path: str) -> None:
    """Run the real `axolotl train` CLI; show its per-round lines, keep everything in `log_path`."""
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    axolotl = os.path.join(os.path.dirname(sys.executable), "axolotl")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([axolotl, "train", config_path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if "selfee" in line and ("round" in line or "WARNING" in line) and "examples/s" not in line:
                print("  " + line.strip().split("] ", 3)[-1][:300], flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"axolotl train failed; see {log_path}")


def evaluate_run(paths: dict, out_dir: str, rounds: list[int], seed: int = 0) -> list[dict]:
    """Gold score, win rate against the SFT model, length and judge accuracies of each round's policy."""
    from .evaluate import evaluate_policy, load_eval_set, load_policy, read_jsonl, score_pairs_accuracy

    prompts, references = load_eval_set(paths["eval_prompts"])
    rows = []
    for name, policy_dir in [("sft", paths["sft_model"])] + [
        (f"round {t}", os.path.join(out_dir, "selfee", f"round_{t}", "adapter")) for t in rounds
    ]:
        if not os.path.exists(policy_dir):
            continue
        model, tokenizer = load_policy(policy_dir, base_model=paths["sft_model"])
        quality = evaluate_policy(model, tokenizer, prompts, references, seed=seed)
        row = {"policy": name, **quality}
        if name != "sft":
            t = int(name.split()[1])
            metrics_path = os.path.join(out_dir, "selfee", f"round_{t}", "metrics.json")
            metrics = json.load(open(metrics_path)) if os.path.exists(metrics_path) else {}
            pairs_path = os.path.join(out_dir, "selfee", f"round_{t}", "pairs.jsonl")
            if os.path.exists(pairs_path):
                judged = [
                    {"prompt": r["messages"][-1]["content"], "chosen": r["responses"][r["chosen_index"]],
                     "rejected": r["responses"][r["rejected_index"]]}
                    for r in read_jsonl(pairs_path) if r["skip_reason"] is None
                ]
                gold = score_pairs_accuracy(judged)
                row["judge_gold_accuracy"] = gold["accuracy"]
                for key in ("num_unequal_length", "longer_chosen_fraction", "gold_prefers_longer_fraction",
                            "unequal_length_accuracy"):
                    row[key] = gold[key]
                row["pairs"] = len(judged)
            row["judge_eval_accuracy"] = metrics.get(keys.JUDGE_ACCURACY, math.nan)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of `evaluate_run` rows."""
    cols = [("policy", "policy", "{}"), ("gold_mean", "gold score", "{:.3f}"), ("win_rate", "win vs SFT", "{:.3f}"),
            ("length_mean", "length", "{:.2f}"), ("pairs", "judged pairs", "{}"),
            ("judge_gold_accuracy", "judge acc. (round's pairs)", "{:.3f}"),
            ("judge_eval_accuracy", "judge acc. (held-out)", "{:.3f}"),
            ("num_unequal_length", "unequal-length pairs", "{}"),
            ("longer_chosen_fraction", "longer chosen", "{:.2f}"),
            ("gold_prefers_longer_fraction", "gold prefers longer", "{:.2f}")]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = []
        for key, _, fmt in cols:
            value = row.get(key)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            cells.append("-" if missing else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run SELFEE on the built-in demo task and report each round.")
    parser.add_argument("--out", default="demo_output", help="where the demo data, run and report go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=["fixed", "variable"], default="fixed",
                        help="fixed: sort 5 numbers; variable: the even numbers of 7 (answers of 1-6 items)")
    args = parser.parse_args(argv)
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .build import build_demo, read_build_stats

    start = time.time()
    data_dir = data_dir_for(args.out, args.task)
    print(f"[1/3] building the demo task in {data_dir} (cached after the first build)", flush=True)
    paths = build_demo(data_dir, seed=args.seed, task=args.task)
    stats = read_build_stats(data_dir)
    print(f"      SFT model: gold {stats['sft_gold_mean']:.3f} +- {stats['sft_gold_std']:.3f}, "
          f"{stats['num_seed_pairs']} seed pairs, {stats['num_gold_pairs']} pool pairs", flush=True)
    run_name = f"run_seed{args.seed}" if args.task == "fixed" else f"run_{args.task}_seed{args.seed}"
    run_dir = os.path.abspath(os.path.join(args.out, run_name))
    config = write_config({k: os.path.abspath(v) for k, v in paths.items()}, run_dir, seed=args.seed)
    print(f"[2/3] axolotl train {config} (log: {run_dir}/train.log)", flush=True)
    train(config, os.path.join(run_dir, "train.log"))
    print("[3/3] evaluating each round's policy on held-out prompts", flush=True)
    rows = evaluate_run(paths, run_dir, rounds=[0, 1, 2], seed=args.seed)
    table = format_table(rows)
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"done in {time.time() - start:.0f}s; report: {run_dir}/report.md", flush=True)


if __name__ == "__main__":
    main()
