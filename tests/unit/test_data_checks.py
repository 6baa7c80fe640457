"""Seed-row checks before load: a fixed-format seed type whose prompts differ from the rounds' chat template warns."""

from __future__ import annotations

import json

from selfee_plugin.data_checks import check_seed_datasets, warn_on_format_mismatch


def _cfg(path, kind):
    return {"datasets": [{"path": str(path), "ds_type": "json", "split": "train", "type": kind}]}


def test_fixed_format_seed_prompts_unlike_the_chat_template_warn_with_examples(tiny_tokenizer, tmp_path, selfee_logs):
    rows = [{"question": "sort 3 1 2", "chosen": "1 2 3", "rejected": "3 1 2", "system": ""}]
    path = tmp_path / "intel.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(path, "chatml.intel")
    formatted = check_seed_datasets(cfg, tiny_tokenizer)
    assert formatted[0][0]["prompt"].rstrip().endswith("<|im_start|>assistant")
    assert warn_on_format_mismatch(cfg, tiny_tokenizer, formatted)
    assert "datasets[0] (type chatml.intel)" in selfee_logs.text and "<|assistant|>" in selfee_logs.text


def test_chat_template_seed_prompts_match_and_do_not_warn(tiny_tokenizer, tiny_data_dir, selfee_logs):
    cfg = _cfg(f"{tiny_data_dir}/seed.jsonl", "chat_template.default")
    formatted = check_seed_datasets(cfg, tiny_tokenizer)
    assert len(formatted[0]) == 16
    assert not warn_on_format_mismatch(cfg, tiny_tokenizer, formatted)
    assert "renders" not in selfee_logs.text
