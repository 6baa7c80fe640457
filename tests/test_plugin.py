"""The plugin through the real `axolotl train` CLI on a tiny local model."""

from __future__ import annotations

import time

from conftest import run_axolotl_train, tiny_train_config


def test_axolotl_train_with_plugin_trains_seed_round(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_train_config(tiny_model_dir, tiny_data_dir, str(out))
    proc = run_axolotl_train(cfg, tmp_path)
    assert "Plugin loaded successfully: selfee_plugin.SelfeePlugin" in proc.output
    assert "'loss':" in proc.output and "rewards/margins" in proc.output
    assert (out / "adapter_model.safetensors").exists()


def test_invalid_selfee_block_fails_before_model_load(tiny_model_dir, tiny_data_dir, tmp_path):
    cfg = tiny_train_config(tiny_model_dir, tiny_data_dir, str(tmp_path / "out"), selfee={"refine": {"smoothing": 0.7}})
    start = time.monotonic()
    proc = run_axolotl_train(cfg, tmp_path, check=False)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "selfee.refine.smoothing" in proc.output and "less than 0.5" in proc.output
    assert "Loading weights" not in proc.output  # rejected before any model was loaded
    print(f"rejected in {elapsed:.1f}s")
