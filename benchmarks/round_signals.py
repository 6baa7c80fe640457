"""Which gold-free round signals predict a round that lowered gold? A learning-rate x seed sweep on the demo task.

For each learning rate and seed it runs the demo (seed round + 2 rounds, LoRA, through `axolotl train`), scores every
round's policy with the gold score, and puts each round's gold change beside the signals the plugin logs without gold
(`selfee/logps_drift_chosen`, `_rejected`, `selfee/kl_previous`, `selfee/judge_agreement_after`, held-out judge
accuracy before/after). It prints a table per round and, per signal, how well "signal beyond a threshold" separates
rounds that lowered gold from rounds that did not (the best threshold on these rounds: an optimistic, in-sample
figure, reported as such).

    python benchmarks/round_signals.py --lrs 1e-4 5e-4 2e-3 --seeds 0 1 2 --out bench_output/signals
    python benchmarks/round_signals.py --task variable --seeds 0     # variable-length answers (the length failure)

Besides the signals it prints, per run, each policy's gold, answer length and judge accuracy on its own pairs, the
share of unequal-length judged pairs whose chosen answer is longer, and how often the gold preferred the longer one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from selfee_demo.build import build_demo  # noqa: E402
from selfee_plugin import metric_keys as keys  # noqa: E402
from selfee_demo.run import data_dir_for, evaluate_run, format_table, train, write_config  # noqa: E402

SIGNALS = {  # key -> direction in which a harmful round is expected to move it
    keys.DRIFT_CHOSEN: "low",
    keys.DRIFT_REJECTED: "low",
    keys.KL_PREVIOUS: "high",
    keys.JUDGE_AGREEMENT_AFTER: "low",
    keys.JUDGE_ACCURACY_AFTER: "low",
    keys.MARGIN_MEAN: "high",
    keys.LONGER_CHOSEN_FRACTION: "high",
}
# Per-round numbers taken from the gold evaluation (`evaluate_run`), beside the signals.
# (The judge's longer-chosen share is a gold-free signal above: the plugin's `selfee/longer_chosen_fraction`.)
QUALITY = ("length_mean", "judge_gold_accuracy", "gold_prefers_longer_fraction")


def run_one(paths: dict, out: str, lr: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Train (unless already finished) and evaluate one run: `(rows of rounds 1-2, evaluate_run's rows)`."""
    run_dir = os.path.abspath(os.path.join(out, f"lr{lr:g}_seed{seed}"))
    summary_path = os.path.join(run_dir, "selfee", "summary.json")
    if not os.path.exists(summary_path) or len(json.load(open(summary_path))) < 3:
        # The guard off: this measures what the unguarded loop does, the evidence the guard's rule comes from.
        config = write_config(paths, run_dir, seed=seed, learning_rate=lr, selfee={"guard": {"enabled": False}})
        train(config, os.path.join(run_dir, "train.log"))
    evaluated = evaluate_run(paths, run_dir, rounds=[0, 1, 2], seed=seed)
    quality = {row["policy"]: row for row in evaluated}
    summary = {row[keys.ROUND]: row for row in json.load(open(summary_path))}
    rows = []
    for t in (1, 2):
        gold, before = quality[f"round {t}"]["gold_mean"], quality[f"round {t - 1}"]["gold_mean"]
        rows.append({"lr": lr, "seed": seed, "round": t, "gold": gold, "gold_change": gold - before,
                     **{key: quality[f"round {t}"].get(key) for key in QUALITY},
                     **{key: summary[t].get(key) for key in SIGNALS}})
    return rows, evaluated


def separation(rows: list[dict], key: str, direction: str, noise: float) -> tuple[float, float, int]:
    """Best in-sample accuracy of `harmful <=> signal beyond threshold` (harmful: gold fell by more than `noise`)."""
    pairs = [(row[key], row["gold_change"] < -noise) for row in rows if row.get(key) is not None]
    if not pairs:
        return float("nan"), float("nan"), 0
    best = (0.0, float("nan"))
    for threshold, _ in pairs:
        flagged = [(v <= threshold) if direction == "low" else (v >= threshold) for v, _ in pairs]
        accuracy = sum(f == harmful for f, (_, harmful) in zip(flagged, pairs)) / len(pairs)
        best = max(best, (accuracy, threshold))
    return best[0], best[1], sum(h for _, h in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 5e-4, 2e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--task", choices=["fixed", "variable"], default="fixed")
    parser.add_argument("--out", default=None,
                        help="default: bench_output/signals (fixed), bench_output/signals_<task>")
    parser.add_argument("--noise", type=float, default=0.02, help="gold change counted as noise (evaluation SE)")
    args = parser.parse_args()
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out = args.out or ("bench_output/signals" if args.task == "fixed" else f"bench_output/signals_{args.task}")
    data_dir = data_dir_for("demo_output", args.task)
    paths = {k: os.path.abspath(v) for k, v in build_demo(data_dir, seed=0, task=args.task).items()}
    rows, tables = [], []
    for lr in args.lrs:
        for seed in args.seeds:
            run_rows, evaluated = run_one(paths, args.out, lr, seed)
            rows += run_rows
            tables.append(f"lr {lr:g}, seed {seed}:\n\n{format_table(evaluated)}\n")
    print("\n".join(tables))

    columns = QUALITY + tuple(SIGNALS)
    print("| lr | seed | round | gold | gold change | " + " | ".join(k.split("/")[-1] for k in columns) + " |")
    print("|" + "---|" * (5 + len(columns)))
    for row in rows:
        cells = [f"{row[k]:.3f}" if isinstance(row.get(k), float) else "-" for k in columns]
        print(f"| {row['lr']:g} | {row['seed']} | {row['round']} | {row['gold']:.3f} | {row['gold_change']:+.3f} | "
              + " | ".join(cells) + " |")
    print(f"\nrounds that lowered gold by more than {args.noise}: "
          f"{sum(r['gold_change'] < -args.noise for r in rows)} of {len(rows)}")
    print("| signal | harmful when | best in-sample accuracy | at threshold |\n|---|---|---|---|")
    for key, direction in SIGNALS.items():
        accuracy, threshold, _ = separation(rows, key, direction, args.noise)
        print(f"| {key} | {direction} | {accuracy:.2f} | {threshold:.3f} |")
    with open(os.path.join(args.out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
