"""`judge.eval_pairs: auto`: a share of the seed pairs is held out of round 0 and measures the judge each round."""

from __future__ import annotations

import json

import pytest


@pytest.mark.e2e
def test_auto_eval_pairs_are_held_out_of_the_seed_round_and_measure_the_judge(tiny_model_dir, tiny_data_dir, tmp_path):
    from helpers import run_axolotl_train, tiny_train_config

    out = tmp_path / "out"
    selfee = {
        "rounds": [4], "seed_epochs": 1,
        "prompts": [{"path": f"{tiny_data_dir}/prompts.jsonl", "ds_type": "json", "type": "prompt"}],
        "generation": {"max_new_tokens": 6, "batch_size": 4, "chunk_size": 4, "temperature": 1.0},
        "judge": {"batch_tokens": 256, "eval_pairs": "auto"}, "guard": {"enabled": False},
    }
    proc = run_axolotl_train(tiny_train_config(tiny_model_dir, tiny_data_dir, str(out), selfee=selfee), tmp_path)
    assert "2 of 16 seed pairs held out of round 0" in proc.output
    assert "selfee round 0: DPO on 14 seed pairs" in proc.output
    held = [json.loads(line) for line in open(out / "selfee" / "eval_pairs_auto.jsonl")]
    seed_prompts = [json.loads(line)["messages"][0]["content"] for line in open(f"{tiny_data_dir}/seed.jsonl")]
    assert len(held) == 2 and all(any(p in row["prompt"] for p in seed_prompts) for row in held)
    metrics = json.loads((out / "selfee" / "round_1" / "metrics.json").read_text())
    assert metrics["selfee/judge_eval_pairs"] == 2
    assert metrics["selfee/judge_accuracy"] in (0.0, 0.5, 1.0) and metrics["selfee/judge_accuracy_after"] in (0.0, 0.5, 1.0)

