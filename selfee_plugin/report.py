"""The run's report, rebuilt after each round: `output_dir/selfee/report.md` (one row per round, the guard's
decisions) and `report.png` (the same signals as curves over rounds; people look at curves before tables).

Rebuild both from any output_dir: `python -m selfee_plugin.report OUTPUT_DIR`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import metric_keys as keys
from .artifacts import PLOT_FILE, REPORT_FILE, SUMMARY_FILE, selfee_root, write_atomic

# (column, metric key, format): what says whether a round helped, without gold (see README "Logged metrics").
COLUMNS = [
    ("round", keys.ROUND, "{:.0f}"),
    ("pairs", keys.PAIRS, "{:.0f}"),
    ("margin", keys.MARGIN_MEAN, "{:.2f}"),
    ("length", keys.RESPONSE_LENGTH_MEAN, "{:.1f}"),
    ("longer chosen", keys.LONGER_CHOSEN_FRACTION, "{:.2f}"),
    ("truncated", keys.TRUNCATED_FRACTION, "{:.2f}"),
    ("judge acc.", keys.JUDGE_ACCURACY, "{:.3f}"),
    ("judge acc. after", keys.JUDGE_ACCURACY_AFTER, "{:.3f}"),
    ("agreement after", keys.JUDGE_AGREEMENT_AFTER, "{:.2f}"),
    ("drift chosen", keys.DRIFT_CHOSEN, "{:+.2f}"),
    ("drift chosen/token", keys.DRIFT_CHOSEN_PER_TOKEN, "{:+.3f}"),
    ("drift rejected", keys.DRIFT_REJECTED, "{:+.2f}"),
    ("drift ratio", keys.DRIFT_RATIO, "{:.1f}"),
    ("KL prev", keys.KL_PREVIOUS, "{:.3f}"),
    ("KL(pi_t, pi_init)", keys.KL_INITIAL_PROBE, "{:.3f}"),
    ("length growth", keys.LENGTH_GROWTH, "{:+.2f}"),
    ("judge acc. on policy", keys.JUDGE_ACCURACY_ON_POLICY, "{:.2f}"),
    ("noisy", keys.TRAIN + keys.NOISY_FRACTION, "{:.2f}"),
    ("loss", keys.TRAIN + "loss", "{:.3f}"),
    ("guard", keys.GUARD_DECISION, "{}"),
]
# report.png: one panel per question, each a few metric curves over rounds.
PANELS = [
    ("judged margins", [keys.MARGIN_MEAN, keys.PREFERENCE_PROBABILITY_MEAN]),
    ("log-prob drift during the round (nats/token)", [keys.DRIFT_CHOSEN_PER_TOKEN, keys.DRIFT_REJECTED_PER_TOKEN]),
    ("KL estimates (nats per answer)", [keys.KL_PREVIOUS, keys.KL_PREVIOUS_PROBE, keys.KL_INITIAL_PROBE]),
    ("answer length before / after the round (probe, tokens)", [keys.PROBE_LENGTH_BEFORE, keys.PROBE_LENGTH_AFTER]),
    ("length bias and truncation", [keys.LONGER_CHOSEN_FRACTION, keys.TRUNCATED_FRACTION]),
    ("judge accuracy", [keys.JUDGE_ACCURACY, keys.JUDGE_ACCURACY_AFTER, keys.JUDGE_ACCURACY_ON_POLICY]),
]


def render(summary: list[dict]) -> str:
    """Markdown: the per-round table ("-" where a round has no such metric, e.g. round 0's judge signals)."""
    header = "| " + " | ".join(name for name, _, _ in COLUMNS) + " |"
    lines = ["# SELFEE run report", "", header, "|" + "---|" * len(COLUMNS)]
    for row in summary:
        cells = [fmt.format(row[key]) if isinstance(row.get(key), (int, float, str)) else "-" for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    fired = [row for row in summary if row.get(keys.GUARD_REJECTED)]
    if fired:
        lines += ["", "## Round guard"]
        for row in fired:
            for attempt in row[keys.GUARD_REJECTED]:
                lines.append(f"- round {row[keys.ROUND]:.0f}, attempt {attempt['attempt']} ({attempt['with']}) "
                             f"rejected: {'; '.join(attempt['reasons'])}")
            lines.append(f"- round {row[keys.ROUND]:.0f}: {row.get(keys.GUARD_DECISION, '-')}")
    lines += ["", "drift: mean change of log pi on the round's chosen / rejected answers during its training; KL prev: "
              "KL(pi_{t-1} || pi_t) on the round's samples; agreement after: share of the round's pairs the judge still "
              "orders the same way after training; length growth: answers sampled after the round vs before (guard probe). "
              "Curves: report.png. Definitions: the plugin README, \"Logged metrics\"."]
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path) -> None:
    """report.png: each panel's metrics against the round; rounds the guard rejected or stopped at are marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), constrained_layout=True)
    rounds = [row[keys.ROUND] for row in summary]
    for ax, (title, panel) in zip(axes.flat, PANELS):
        for key in panel:
            points = [(r, row[key]) for r, row in zip(rounds, summary) if isinstance(row.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o", label=key.split("/", 1)[1])
        for r, row in zip(rounds, summary):
            if row.get(keys.GUARD_REJECTED):
                ax.axvline(r, color="red", alpha=0.3, linestyle="--")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("SELFEE run report (red dashes: a round the guard rejected an attempt of)", fontsize=11)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(output_dir) -> Path:
    root = selfee_root(output_dir)
    summary = json.loads((root / SUMMARY_FILE).read_text()) if (root / SUMMARY_FILE).exists() else []
    path = root / REPORT_FILE
    write_atomic(path, lambda tmp: tmp.write_text(render(summary)))
    write_atomic(root / PLOT_FILE, lambda tmp: plot(summary, tmp))
    return path


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m selfee_plugin.report OUTPUT_DIR")
    print(write_report(args[0]))


if __name__ == "__main__":
    main()
