"""The run's report, rebuilt after each round: `output_dir/selfee/report.md` (one row per round, the guard's
decisions) and `report.png` (the same signals as curves over rounds; people look at curves before tables).

Rebuild both from any output_dir: `python -m selfee_plugin.report OUTPUT_DIR`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .artifacts import SUMMARY_FILE, selfee_root

REPORT_FILE = "report.md"
PLOT_FILE = "report.png"
# (column, metric key, format): what says whether a round helped, without gold (see README "Logged metrics").
COLUMNS = [
    ("round", "selfee/round", "{:.0f}"),
    ("pairs", "selfee/pairs", "{:.0f}"),
    ("margin", "selfee/margin_mean", "{:.2f}"),
    ("length", "selfee/response_length_mean", "{:.1f}"),
    ("longer chosen", "selfee/longer_chosen_fraction", "{:.2f}"),
    ("truncated", "selfee/truncated_fraction", "{:.2f}"),
    ("judge acc.", "selfee/judge_accuracy", "{:.3f}"),
    ("judge acc. after", "selfee/judge_accuracy_after", "{:.3f}"),
    ("agreement after", "selfee/judge_agreement_after", "{:.2f}"),
    ("drift chosen", "selfee/logps_drift_chosen", "{:+.2f}"),
    ("drift chosen/token", "selfee/logps_drift_chosen_per_token", "{:+.3f}"),
    ("drift rejected", "selfee/logps_drift_rejected", "{:+.2f}"),
    ("drift ratio", "selfee/logps_drift_ratio", "{:.1f}"),
    ("KL prev", "selfee/kl_previous", "{:.3f}"),
    ("KL(pi_t, pi_init)", "selfee/kl_initial_probe", "{:.3f}"),
    ("length growth", "selfee/length_growth", "{:+.2f}"),
    ("judge acc. on policy", "selfee/judge_accuracy_on_policy", "{:.2f}"),
    ("noisy", "train/selfee/noisy_fraction", "{:.2f}"),
    ("loss", "train/loss", "{:.3f}"),
    ("guard", "selfee/guard_decision", "{}"),
]
# report.png: one panel per question, each a few metric curves over rounds.
PANELS = [
    ("judged margins", ["selfee/margin_mean", "selfee/preference_probability_mean"]),
    ("log-prob drift during the round (nats/token)",
     ["selfee/logps_drift_chosen_per_token", "selfee/logps_drift_rejected_per_token"]),
    ("KL estimates (nats per answer)", ["selfee/kl_previous", "selfee/kl_previous_probe", "selfee/kl_initial_probe"]),
    ("answer length before / after the round (probe, tokens)",
     ["selfee/probe_length_before", "selfee/probe_length_after"]),
    ("length bias and truncation", ["selfee/longer_chosen_fraction", "selfee/truncated_fraction"]),
    ("judge accuracy", ["selfee/judge_accuracy", "selfee/judge_accuracy_after", "selfee/judge_accuracy_on_policy"]),
]


def render(summary: list[dict]) -> str:
    """Markdown: the per-round table ("-" where a round has no such metric, e.g. round 0's judge signals)."""
    header = "| " + " | ".join(name for name, _, _ in COLUMNS) + " |"
    lines = ["# SELFEE run report", "", header, "|" + "---|" * len(COLUMNS)]
    for row in summary:
        cells = [fmt.format(row[key]) if isinstance(row.get(key), (int, float, str)) else "-" for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    fired = [row for row in summary if row.get("selfee/guard_rejected")]
    if fired:
        lines += ["", "## Round guard"]
        for row in fired:
            for attempt in row["selfee/guard_rejected"]:
                lines.append(f"- round {row['selfee/round']:.0f}, attempt {attempt['attempt']} ({attempt['with']}) "
                             f"rejected: {'; '.join(attempt['reasons'])}")
            lines.append(f"- round {row['selfee/round']:.0f}: {row.get('selfee/guard_decision', '-')}")
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
    rounds = [row["selfee/round"] for row in summary]
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            points = [(r, row[key]) for r, row in zip(rounds, summary) if isinstance(row.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o", label=key.split("/", 1)[1])
        for r, row in zip(rounds, summary):
            if row.get("selfee/guard_rejected"):
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
    path.write_text(render(summary))
    plot(summary, root / PLOT_FILE)
    return path


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m selfee_plugin.report OUTPUT_DIR")
    print(write_report(args[0]))


if __name__ == "__main__":
    main()
