"""The run report: one markdown row per round from summary.json, rebuildable from an output_dir."""

from __future__ import annotations

import json

from selfee_plugin.report import COLUMNS, main


def test_report_has_a_row_per_round_and_dashes_for_missing_metrics(tmp_path, capsys):
    root = tmp_path / "selfee"
    root.mkdir()
    summary = [
        {"selfee/round": 0, "selfee/pairs": 96, "train/loss": 0.61},
        {"selfee/round": 1, "selfee/pairs": 368, "selfee/margin_mean": 1.234, "selfee/logps_drift_chosen": -2.5,
         "selfee/kl_previous": 0.0123, "selfee/judge_agreement_after": 0.9, "train/loss": 0.55},
    ]
    (root / "summary.json").write_text(json.dumps(summary))
    main([str(tmp_path)])
    assert capsys.readouterr().out.strip().endswith("report.md")
    lines = (root / "report.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert len(table) == 1 + len(summary)  # header + rounds
    cells = [cell.strip() for cell in table[2].strip("|").split("|")]
    assert len(cells) == len(COLUMNS)
    by_name = dict(zip([name for name, _, _ in COLUMNS], cells))
    assert by_name["round"] == "1" and by_name["margin"] == "1.23" and by_name["drift chosen"] == "-2.50"
    assert by_name["KL prev"] == "0.012" and by_name["judge acc."] == "-"
