"""The plugin through the real `axolotl train` CLI: a bad `selfee:` block fails before any model loads.

Training through the CLI with the plugin is covered by tests/test_rounds.py and tests/test_example_configs.py.
"""

from __future__ import annotations

import time

from conftest import run_axolotl_train, tiny_train_config


def test_invalid_selfee_block_fails_before_model_load(tiny_model_dir, tiny_data_dir, tmp_path):
    cfg = tiny_train_config(tiny_model_dir, tiny_data_dir, str(tmp_path / "out"), selfee={"refine": {"smoothing": 0.7}})
    start = time.monotonic()
    proc = run_axolotl_train(cfg, tmp_path, check=False)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "selfee.refine.smoothing" in proc.output and "less than 0.5" in proc.output
    assert "Loading weights" not in proc.output  # rejected before any model was loaded
    print(f"rejected in {elapsed:.1f}s")
