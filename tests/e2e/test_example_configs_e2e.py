"""The full fine-tuning example, made local (helpers.localize), trained through the real `axolotl train` CLI."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import EXAMPLES_DIR, load_example, localize, run_axolotl_train


def test_full_finetuning_example_runs_end_to_end_on_cpu(example_assets, tmp_path):
    """The Qwen full fine-tuning example, on the tiny model and CPU-sized settings, through the real CLI."""
    cfg = localize(load_example(EXAMPLES_DIR / "qwen2.5-0.5b-full.yml"), example_assets, tmp_path)
    cfg.update(bf16=False, fp16=False, optimizer="adamw_torch", gradient_checkpointing=False, sequence_len=64,
               micro_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3, save_strategy="no",
               dataset_num_proc=1, dataloader_num_workers=0)
    cfg.pop("attn_implementation", None)
    cfg.pop("gradient_checkpointing_kwargs", None)
    selfee = cfg["selfee"]
    selfee.update(rounds=[4, 4], seed_epochs=1)
    selfee["generation"].update(max_new_tokens=8, batch_size=4, max_prompt_length=64)
    proc = run_axolotl_train(cfg, tmp_path)
    for t in range(3):
        assert f"selfee round {t} done" in proc.output
    root = Path(cfg["output_dir"]) / "selfee"
    assert all((root / f"round_{t}" / "model" / "model.safetensors").exists() for t in range(3))
    assert json.loads((root / "round_2" / "metrics.json").read_text())["selfee/judge_eval_pairs"] > 0
