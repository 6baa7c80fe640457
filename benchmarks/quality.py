"""Quality benchmark on the demo task: does SELFEE spread the seed's preference beyond DPO on the seed alone?

Compares, on the same task, model and budget, over several seeds:
  SFT; DPO on the seed only (round 0); SELFEE after rounds 1 and 2 (paper defaults); SELFEE without refinement
  (smoothing 0); SELFEE with de-coupled detection (extrapolation > 0); DPO on gold labels for the whole pool.
Every SELFEE variant of a seed resumes from the same round 0 (copied), so they differ only in what they change.

    python benchmarks/quality.py --seeds 0 1 2 --out bench_output
    python benchmarks/quality.py --task variable --seeds 0 1 2      # variable-length answers, own output dir
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

# The demo package lives outside the wheel, in examples/selfee_demo.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from selfee_demo.build import build_demo  # noqa: E402
from selfee_demo.run import data_dir_for, evaluate_run, train, write_config  # noqa: E402

VARIANTS = {
    "selfee": {},
    "selfee_alpha0": {"refine": {"smoothing": 0.0}},
    "selfee_lambda": {"refine": {"extrapolation": 0.5}},
}
METRICS = ("gold_mean", "win_rate", "length_mean", "judge_gold_accuracy", "judge_eval_accuracy",
           "longer_chosen_fraction", "gold_prefers_longer_fraction")


def run_seed(paths: dict, out: str, seed: int, overrides: dict) -> list[dict]:
    rows = []
    base_dir = os.path.join(out, f"seed{seed}", "selfee")
    for name, selfee in VARIANTS.items():
        run_dir = os.path.join(out, f"seed{seed}", name)
        if name != "selfee" and not os.path.exists(os.path.join(run_dir, "selfee", "state.json")):
            # Same round 0 for every variant: copy the finished seed round and let the loop resume from it.
            os.makedirs(os.path.join(run_dir, "selfee"), exist_ok=True)
            shutil.copytree(os.path.join(base_dir, "selfee", "round_0"), os.path.join(run_dir, "selfee", "round_0"))
            state = json.load(open(os.path.join(base_dir, "selfee", "state.json")))
            state["completed"] = [0]
            json.dump(state, open(os.path.join(run_dir, "selfee", "state.json"), "w"))
        config = write_config(paths, run_dir, seed=seed, selfee=selfee, **overrides)
        start = time.time()
        print(f"seed {seed} {name}: training", flush=True)
        train(config, os.path.join(run_dir, "train.log"))
        print(f"seed {seed} {name}: trained in {time.time() - start:.0f}s", flush=True)
        for row in evaluate_run(paths, run_dir, rounds=[0, 1, 2] if name == "selfee" else [1, 2], seed=seed):
            if row["policy"] == "sft" and name != "selfee":
                continue
            label = {"sft": "SFT", "round 0": "DPO, seed only"}.get(row["policy"], f"{name} {row['policy']}")
            rows.append({"seed": seed, "method": label, **{k: row.get(k, math.nan) for k in METRICS}})

    gold_dir = os.path.join(out, f"seed{seed}", "gold")
    config = write_config(
        paths, gold_dir, seed=seed, selfee={"rounds": 0, "prompts": None, "seed_epochs": 1,
                                            "judge": {"eval_pairs": None}},
        datasets=[{"path": p, "ds_type": "json", "split": "train", "type": "chat_template.default"}
                  for p in (paths["seed"], paths["gold_pairs"])], **overrides,
    )
    print(f"seed {seed} gold: training", flush=True)
    train(config, os.path.join(gold_dir, "train.log"))
    for row in evaluate_run(paths, gold_dir, rounds=[0], seed=seed):
        if row["policy"] == "round 0":
            rows.append({"seed": seed, "method": "DPO, gold labels for the whole pool",
                         **{k: row.get(k, math.nan) for k in METRICS}})
    return rows


def aggregate(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    header = ("| method | seeds | gold score | win vs SFT | length | judge acc. (round's pairs) "
              "| judge acc. (held-out) | longer chosen | gold prefers longer |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        cells = [method, str(sum(r["method"] == method for r in rows))]
        for key in METRICS:
            values = [r[key] for r in rows if r["method"] == method and not math.isnan(r[key])]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--task", choices=["fixed", "variable"], default="fixed",
                        help="fixed: sort 5 numbers; variable: the even numbers of 7 (answers of 1-6 items)")
    parser.add_argument("--out", default=None, help="default: bench_output (fixed), bench_output/quality_<task>")
    parser.add_argument("--learning-rate", type=float, default=None, help="override the demo's learning rate")
    args = parser.parse_args()
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = os.path.abspath(args.out or ("bench_output" if args.task == "fixed" else f"bench_output/quality_{args.task}"))
    paths = {k: os.path.abspath(v) for k, v in build_demo(data_dir_for(out, args.task), seed=0, task=args.task).items()}
    overrides = {"learning_rate": args.learning_rate} if args.learning_rate else {}
    rows = []
    for seed in args.seeds:
        rows += run_seed(paths, out, seed, overrides)
        json.dump(rows, open(os.path.join(out, "results.json"), "w"), indent=1)
    table = aggregate(rows)
    open(os.path.join(out, "results.md"), "w").write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
