"""The round-signals benchmark's separation score, on hand-made rounds."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "round_signals.py"


def _module():
    spec = importlib.util.spec_from_file_location("round_signals", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_separation_finds_the_threshold_that_splits_harmful_rounds():
    """Drifts -1.0 and -0.5 lowered gold, +0.2 and +0.4 did not: `low` at -0.5 splits all four; `high` cannot."""
    separation = _module().separation
    rows = [{"d": -1.0, "gold_change": -0.3}, {"d": -0.5, "gold_change": -0.1},
            {"d": 0.2, "gold_change": 0.05}, {"d": 0.4, "gold_change": 0.01}]
    accuracy, threshold, harmful = separation(rows, "d", "low", noise=0.02)
    assert (accuracy, threshold, harmful) == (1.0, -0.5, 2)
    assert separation(rows, "d", "high", noise=0.02)[0] < 1.0
    assert math.isnan(separation([{"gold_change": 0.0}], "d", "low", 0.02)[0])
