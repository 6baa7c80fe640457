"""The run's report, `output_dir/selfee/report.md`: one row per finished round, rebuilt after each round.

Rebuild it from any output_dir: `python -m selfee_plugin.report OUTPUT_DIR`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .artifacts import SUMMARY_FILE, selfee_root

REPORT_FILE = "report.md"
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
    ("drift rejected", "selfee/logps_drift_rejected", "{:+.2f}"),
    ("KL prev", "selfee/kl_previous", "{:.3f}"),
    ("noisy", "train/selfee/noisy_fraction", "{:.2f}"),
    ("loss", "train/loss", "{:.3f}"),
]


def render(summary: list[dict]) -> str:
    """Markdown: the per-round table ("-" where a round has no such metric, e.g. round 0's judge signals)."""
    header = "| " + " | ".join(name for name, _, _ in COLUMNS) + " |"
    lines = ["# SELFEE run report", "", header, "|" + "---|" * len(COLUMNS)]
    for row in summary:
        cells = [fmt.format(row[key]) if isinstance(row.get(key), (int, float)) else "-" for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "drift: mean change of log pi on the round's chosen / rejected answers during its training; KL prev: "
              "KL(pi_{t-1} || pi_t) on the round's samples; agreement after: share of the round's pairs the judge still "
              "orders the same way after training. Definitions: the plugin README, \"Logged metrics\"."]
    return "\n".join(lines) + "\n"


def write_report(output_dir) -> Path:
    root = selfee_root(output_dir)
    summary = json.loads((root / SUMMARY_FILE).read_text()) if (root / SUMMARY_FILE).exists() else []
    path = root / REPORT_FILE
    path.write_text(render(summary))
    return path


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m selfee_plugin.report OUTPUT_DIR")
    print(write_report(args[0]))


if __name__ == "__main__":
    main()
