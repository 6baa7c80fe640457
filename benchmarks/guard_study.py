"""Does the round guard keep SELFEE from ending worse than its round 0? Learning rate x seed x task, on the demo.

Each run is the demo (seed round + rounds of 400 and 800 prompts, LoRA, through `axolotl train`) with a `selfee:`
variant: `guard` (the defaults: guard on), `off` (guard off: what it would have done is logged), or `labels` (guard
on + `selfee.labels` at K = 5% of each round's prompts, labelled by the demo's gold score, `selfee_demo.task:gold_label`).
Every policy is scored with the gold score over 200 held-out prompts x 2 samples, once per evaluation seed
(`--eval-seeds`, the same for every policy so differences are paired): each finished round's, each attempt the guard
rejected (`round_<t>/rejected/attempt_<k>/`), and the final one (the last finished round). A final policy counts as
below its round 0 when the mean paired difference is below -2 standard errors (over the evaluation seeds): the
evaluation noise, measured rather than assumed.

    python benchmarks/guard_study.py --tasks fixed variable --lrs 1e-4 5e-4 2e-3 --seeds 0 1 2
    python benchmarks/guard_study.py --tasks variable --lrs 5e-4 --variants labels
    python benchmarks/guard_study.py --from-json a.json b.json     # the tables again, from saved rows
    python benchmarks/guard_study.py --round-zero                  # round 0 judged offline by the same rules

It prints one line per round and per rejected attempt, then per (task, lr, variant) the final gold minus round 0's
over seeds, and what each drift signal said about the rounds it was measured on; `--json` keeps every row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")
sys.path.insert(0, EXAMPLES)

from selfee_demo.build import build_demo  # noqa: E402
from selfee_plugin import metric_keys as keys  # noqa: E402
from selfee_demo.evaluate import evaluate_policy, load_eval_set, load_policy  # noqa: E402
from selfee_demo.run import data_dir_for, train, write_config  # noqa: E402

VARIANTS = {
    "guard": {},
    "off": {"guard": {"enabled": False}},
    "labels": {"labels": {"per_round": 0.05, "function": "selfee_demo.task:gold_label"}},
}
SIGNALS = (keys.DRIFT_CHOSEN_PER_TOKEN, keys.DRIFT_RATIO, keys.KL_PREVIOUS, keys.LENGTH_GROWTH,
           keys.LONGER_CHOSEN_FRACTION, keys.JUDGE_ACCURACY_ON_POLICY, keys.RESPONSE_LENGTH_MEAN)


def gold(paths: dict, policy_dir: str, eval_seeds: list[int], eval_set) -> tuple[list[float], float]:
    """Gold mean per evaluation seed, and the mean answer length over all of them."""
    model, tokenizer = load_policy(policy_dir, base_model=paths["sft_model"])
    runs = [evaluate_policy(model, tokenizer, *eval_set, seed=s) for s in eval_seeds]
    return [q["gold_mean"] for q in runs], statistics.fmean(q["length_mean"] for q in runs)


def run_one(paths: dict, out: str, task: str, lr: float, seed: int, variant: str, eval_seeds: list[int]) -> list[dict]:
    run_dir = os.path.abspath(os.path.join(out, task, f"{variant}_lr{lr:g}_seed{seed}"))
    root = Path(run_dir) / "selfee"
    state = json.loads((root / "state.json").read_text()) if (root / "state.json").exists() else {}
    if not (state.get("stopped") or {1, 2} <= set(state.get("completed", []))):
        config = write_config(paths, run_dir, seed=seed, learning_rate=lr, selfee=VARIANTS[variant])
        train(config, os.path.join(run_dir, "train.log"))
        state = json.loads((root / "state.json").read_text())
    eval_set = load_eval_set(paths["eval_prompts"])
    summary = {row[keys.ROUND]: row for row in json.loads((root / "summary.json").read_text())}
    rows = []
    for t in sorted(summary):
        metrics = summary[t]
        base = {"task": task, "lr": lr, "seed": seed, "variant": variant, "round": t,
                **{key: metrics.get(key) for key in SIGNALS}}
        for attempt_dir in sorted((root / f"round_{t}" / "rejected").glob("attempt_*")):
            attempt = json.loads((attempt_dir / "metrics.json").read_text())
            golds, length = gold(paths, str(attempt_dir / "adapter"), eval_seeds, eval_set) \
                if (attempt_dir / "adapter").exists() else (None, None)
            rows.append({**base, **{key: attempt.get(key) for key in SIGNALS}, "policy": attempt_dir.name,
                         "decision": "rejected (" + attempt["with"] + ")", "golds": golds, "length": length})
        adapter = root / f"round_{t}" / "adapter"
        if adapter.exists():
            golds, length = gold(paths, str(adapter), eval_seeds, eval_set)
            rows.append({**base, "policy": "final" if t == max(state["completed"]) else "kept",
                         "decision": metrics.get(keys.GUARD_DECISION, "-"), "golds": golds, "length": length})
        elif t == (state.get("stopped") or {}).get("round"):
            rows.append({**base, "policy": "-", "decision": "stopped", "golds": None, "length": None})
    for row in rows:
        row["gold"] = None if row["golds"] is None else statistics.fmean(row["golds"])
    return rows


def fmt(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


def paired_change(golds: list[float], start: list[float]) -> tuple[float, float]:
    """Mean gold difference over the paired evaluation seeds, and 2 standard errors of it (the evaluation noise)."""
    diffs = [a - b for a, b in zip(golds, start)]
    return statistics.fmean(diffs), (2 * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0)


def rule_evidence(rows: list[dict]) -> None:
    """Every trained attempt (accepted or rejected) against the policy its round started from, grouped by what the
    log-prob drift said: the evidence behind the guard's first two rules."""
    start = {(r["task"], r["variant"], r["lr"], r["seed"], r["round"]): r["golds"]
             for r in rows if r["policy"] in ("kept", "final")}
    # A guard-off round repeats the guard-on run's first attempt when the guard accepted every earlier round as is.
    guard_retried = {(r["task"], r["lr"], r["seed"], r["round"]) for r in rows
                     if r["variant"] == "guard" and r["policy"].startswith("attempt")}

    def repeats_guard_run(r) -> bool:
        return r["variant"] == "off" and not any((r["task"], r["lr"], r["seed"], t) in guard_retried
                                                 for t in range(1, r["round"]))

    groups = {}
    for r in rows:
        before = start.get((r["task"], r["variant"], r["lr"], r["seed"], r["round"] - 1))
        if r["round"] == 0 or r["golds"] is None or before is None or repeats_guard_run(r):
            continue
        chosen, ratio = r[keys.DRIFT_CHOSEN_PER_TOKEN], r[keys.DRIFT_RATIO]
        group = ("chosen log-probs fell (rule 1 fires)" if chosen < 0
                 else "chosen rose, drift ratio > 3 (rule 2 fires)" if ratio and ratio > 3
                 else "chosen rose, drift ratio <= 3 (passes)")
        groups.setdefault(group, []).append(paired_change(r["golds"], before) + (ratio,))
    print("\n| drift during the round | trained attempts | gold change vs the round's start (min .. max) "
          "| raised gold by > noise | lowered it by > noise | drift ratio (min .. max) |")
    print("|---|---|---|---|---|---|")
    for group, changes in sorted(groups.items()):
        ratios = [c[2] for c in changes if c[2] is not None]
        print(f"| {group} | {len(changes)} | {min(c[0] for c in changes):+.3f} .. {max(c[0] for c in changes):+.3f} | "
              f"{sum(c > n for c, n, _ in changes)} | {sum(c < -n for c, n, _ in changes)} | "
              + (f"{min(ratios):.1f} .. {max(ratios):.1f} |" if ratios else "- |"))


def report(rows: list[dict]) -> None:
    header = ("| task | variant | lr | seed | round | policy | decision | gold | length | drift chosen/token | drift ratio "
              "| KL prev | length growth | longer chosen | judge acc. on policy |")
    print(header + "\n|" + "---|" * header.count(" | ") + "---|")
    for r in rows:
        print(f"| {r['task']} | {r['variant']} | {r['lr']:g} | {r['seed']} | {r['round']} | {r['policy']} | "
              f"{r['decision']} | {fmt(r['gold'])} | {fmt(r['length'], '.2f')} | "
              f"{fmt(r['selfee/logps_drift_chosen_per_token'], '+.3f')} | {fmt(r['selfee/logps_drift_ratio'], '.1f')} | "
              f"{fmt(r['selfee/kl_previous'])} | "
              f"{fmt(r['selfee/length_growth'], '+.2f')} | {fmt(r['selfee/longer_chosen_fraction'], '.2f')} | "
              f"{fmt(r['selfee/judge_accuracy_on_policy'], '.2f')} |")
    print("\n| task | variant | lr | final - round 0 gold (per seed, +- 2 SE) | mean | runs below round 0 by > noise |")
    print("|---|---|---|---|---|---|")
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["variant"], r["lr"]), {}).setdefault(r["seed"], []).append(r)
    for (task, variant, lr), by_seed in groups.items():
        changes = []
        for seed_rows in by_seed.values():
            round0 = next(r["golds"] for r in seed_rows if r["round"] == 0 and r["policy"] in ("final", "kept"))
            final = next(r["golds"] for r in seed_rows if r["policy"] == "final")
            changes.append(paired_change(final, round0))
        worse = sum(c < -noise for c, noise in changes)
        print(f"| {task} | {variant} | {lr:g} | {', '.join(f'{c:+.3f} +- {n:.3f}' for c, n in changes)} | "
              f"{statistics.mean(c for c, _ in changes):+.3f} | {worse} of {len(changes)} |")
    rule_evidence(rows)


def round_zero(out: str, tasks: list[str], lrs: list[float], seeds: list[int], eval_seeds: list[int]) -> None:
    """Would the guard's rules judge round 0 (seed DPO) well? Round 0's policy against the SFT model it started from,
    on the seed pairs: the drift signals, computed by the plugin's own code, and the guard's verdict, beside the gold
    change. Reads the `guard` runs under `out`; trains nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfee_plugin.config_blocks import GuardConfig
    from selfee_plugin.diagnostics import post_round_signals
    from selfee_plugin.formatting import format_preference_rows, tokenize_completion
    from selfee_plugin.guard import verdict
    from selfee_plugin.logprobs import completion_logps

    print("\n| task | lr | seed | drift chosen/token | drift rejected/token | drift ratio | guard would | "
          "round 0 - SFT gold (+- 2 SE) |\n|---|---|---|---|---|---|---|---|")
    for task in tasks:
        paths = {k: os.path.abspath(v) for k, v in build_demo(data_dir_for("demo_output", task), task=task).items()}
        tokenizer = AutoTokenizer.from_pretrained(paths["sft_model"])
        sft = AutoModelForCausalLM.from_pretrained(paths["sft_model"])
        pairs = format_preference_rows([json.loads(line) for line in open(paths["seed"])], tokenizer)
        sequences = [tokenize_completion(tokenizer, r["prompt"], r[k]) for r in pairs for k in ("chosen", "rejected")]
        before, lengths = completion_logps(sft, sequences, tokenizer.pad_token_id)
        eval_set = load_eval_set(paths["eval_prompts"])
        sft_golds = [evaluate_policy(sft, tokenizer, *eval_set, seed=s)["gold_mean"] for s in eval_seeds]
        rows = [{"policy_logps": before[i:i + 2].tolist(), "ref_logps": before[i:i + 2].tolist(), "chosen_index": 0,
                 "rejected_index": 1, "completion_lengths": lengths[i:i + 2].tolist()}
                for i in range(0, len(sequences), 2)]
        for lr in lrs:
            for seed in seeds:
                adapter = Path(out) / task / f"guard_lr{lr:g}_seed{seed}" / "selfee" / "round_0" / "adapter"
                model, _ = load_policy(str(adapter), base_model=paths["sft_model"])
                after, _ = completion_logps(model, sequences, tokenizer.pad_token_id)
                signals = post_round_signals(rows, [after[i:i + 2].tolist() for i in range(0, len(sequences), 2)])
                golds, _ = gold(paths, str(adapter), eval_seeds, eval_set)
                change, noise = paired_change(golds, sft_golds)
                fires = "fire" if verdict(signals, {}, GuardConfig()) else "pass"
                print(f"| {task} | {lr:g} | {seed} | {signals['selfee/logps_drift_chosen_per_token']:+.3f} | "
                      f"{signals['selfee/logps_drift_rejected_per_token']:+.3f} | "
                      f"{fmt(signals.get('selfee/logps_drift_ratio'), '.1f')} | {fires} | {change:+.3f} +- {noise:.3f} |",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["fixed", "variable"], choices=["fixed", "variable"])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 5e-4, 2e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["guard"], choices=sorted(VARIANTS))
    parser.add_argument("--out", default="bench_output/guard")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=list(range(6)),
                        help="sampling seeds of the gold evaluation (each: 200 prompts x 2 samples)")
    parser.add_argument("--json", default=None, help="write every row here")
    parser.add_argument("--from-json", nargs="+", default=None, help="report the rows of earlier --json files; run nothing")
    parser.add_argument("--round-zero", action="store_true",
                        help="judge the `guard` runs' round 0 against the SFT model with the guard's rules; train nothing")
    args = parser.parse_args()
    if args.round_zero:
        round_zero(args.out, args.tasks, args.lrs, args.seeds, args.eval_seeds)
        return
    if args.from_json:
        report([row for path in args.from_json for row in json.loads(Path(path).read_text())])
        return
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The labeller (selfee_demo.task:gold_label) is imported inside `axolotl train`.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [EXAMPLES, os.environ.get("PYTHONPATH")]))
    rows = []
    for task in args.tasks:
        data_dir = data_dir_for("demo_output", task)
        paths = {k: os.path.abspath(v) for k, v in build_demo(data_dir, seed=0, task=task).items()}
        for variant in args.variants:
            for lr in args.lrs:
                for seed in args.seeds:
                    rows += run_one(paths, args.out, task, lr, seed, variant, args.eval_seeds)
    report(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
