"""The round guard and the on-policy labels through the real `axolotl train` CLI: a firing guard retries, then stops at
the last good round (under LoRA and full fine-tuning); labels stop the run, and a rerun trains with them."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_axolotl_train, tiny_rounds_config


def _tiny_rounds_cfg(model_dir, data_dir, out, **selfee):
    return tiny_rounds_config(model_dir, data_dir, out, rounds=[6, 6], batch_size=4,
                              selfee={"guard": {"probe_prompts": 4}, **selfee})


def _lora_weights(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_a_firing_guard_retries_then_stops_at_the_last_good_round(tiny_model_dir, tiny_data_dir, tmp_path):
    """A rule no round can pass (chosen log-probs must rise by 100 nats/token): round 1 is trained, rejected,
    retried at half the learning rate, rejected again, and the loop stops with round 0's policy as the final model;
    round 2 never runs, and a rerun trains nothing."""
    out = tmp_path / "out"
    cfg = _tiny_rounds_cfg(tiny_model_dir, tiny_data_dir, out, guard={"probe_prompts": 4, "min_chosen_drift": 100.0})
    proc = run_axolotl_train(cfg, tmp_path)
    assert "round 1 attempt 1 (the round's settings) rejected" in proc.output
    assert "retrying round 1 once on the same judged pairs with learning rate x0.5" in proc.output
    assert "the round guard stopped the loop at round 1" in proc.output and "round 0's policy" in proc.output
    assert "selfee round 2" not in proc.output
    root = out / "selfee"
    state = json.loads((root / "state.json").read_text())
    assert state["completed"] == [0] and state["stopped"]["round"] == 1
    first = json.loads((root / "round_1" / "rejected" / "attempt_1" / "metrics.json").read_text())
    second = json.loads((root / "round_1" / "rejected" / "attempt_2" / "metrics.json").read_text())
    assert second["selfee/learning_rate"] == pytest.approx(first["selfee/learning_rate"] / 2)
    assert "selfee/length_growth" in first and "nats/token" in first["selfee/guard_reasons"][0]
    assert {"selfee/kl_initial_probe", "selfee/kl_previous_probe", "selfee/probe_truncated_after"} <= first.keys()
    assert not (root / "round_1" / "adapter").exists() and not (root / "round_2").exists()
    summary = json.loads((root / "summary.json").read_text())
    assert [(r["selfee/round"], r.get("selfee/guard_decision")) for r in summary] == [(0, None), (1, "stopped")]
    assert len(summary[1]["selfee/guard_rejected"]) == 2
    assert "## Round guard" in (root / "report.md").read_text() and (root / "report.png").stat().st_size > 10_000
    # The final model Axolotl saved is round 0's policy, not a rejected one.
    final, round_0 = _lora_weights(out), _lora_weights(root / "round_0" / "adapter")
    rejected = _lora_weights(root / "round_1" / "rejected" / "attempt_1" / "adapter")
    assert final.keys() == round_0.keys()
    for name in final:
        assert torch.equal(final[name], round_0[name]), name
    assert any(not torch.equal(rejected[name], round_0[name]) for name in final)

    rerun = run_axolotl_train(cfg, tmp_path)
    assert "the round guard stopped the loop at round 1" in rerun.output
    assert "DPO on" not in rerun.output and "generating and judging" not in rerun.output


def test_labels_stop_the_run_then_a_rerun_trains_with_them(tiny_model_dir, tiny_data_dir, tmp_path):
    """`selfee.labels` without a function: round 1 is judged, 2 of its pairs are exported and the run stops asking for
    labels; with labels filled in, the same command continues: the judge's agreement is measured, a `rejected` label
    swaps its pair in the training data, round 1 finishes and round 2 asks for its own labels."""
    out = tmp_path / "out"
    cfg = _tiny_rounds_cfg(tiny_model_dir, tiny_data_dir, out, labels={"per_round": 2}, guard={"enabled": False})
    stopped = run_axolotl_train(cfg, tmp_path, check=False)
    assert stopped.returncode != 0
    to_label = out / "selfee" / "round_1" / "to_label.jsonl"
    assert f"2 of this round's pairs are waiting for labels in {to_label}" in stopped.output
    assert "Traceback" not in stopped.output.split("waiting for labels")[-1]
    rows = [json.loads(line) for line in open(to_label)]
    assert [r["label"] for r in rows] == [None, None] and all(r["chosen"] != r["rejected"] for r in rows)
    rows[0]["label"], rows[1]["label"] = "chosen", "rejected"
    to_label.write_text("".join(json.dumps(r) + "\n" for r in rows))

    proc = run_axolotl_train(cfg, tmp_path, check=False)
    assert "selfee round 1 done" in proc.output
    assert f"waiting for labels in {out / 'selfee' / 'round_2' / 'to_label.jsonl'}" in proc.output  # round 2's turn
    metrics = json.loads((out / "selfee" / "round_1" / "metrics.json").read_text())
    assert metrics["selfee/labels"] == 2 and metrics["selfee/judge_accuracy_on_policy"] == 0.5
    assert metrics["selfee/labels_flipped"] == 1


def test_a_firing_guard_under_full_fine_tuning_restores_the_whole_model(tiny_model_dir, tiny_data_dir, tmp_path):
    """Full fine-tuning (the paper's setting): the guard restores every weight of pi_{t-1}, not an adapter. The final
    model Axolotl saves equals round 0's saved policy, and the rejected attempt differs from it."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    # judge.share_prompts too: its judging, re-scoring and probe run through a round of the real CLI here.
    cfg = _tiny_rounds_cfg(tiny_model_dir, tiny_data_dir, out, guard={"probe_prompts": 4, "min_chosen_drift": 100.0},
                           judge={"batch_tokens": 256, "share_prompts": True})
    for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_linear"):
        cfg.pop(key)
    cfg.update(adapter=None, learning_rate=1e-4)
    proc = run_axolotl_train(cfg, tmp_path)
    assert "the round guard stopped the loop at round 1" in proc.output and "round 0's policy" in proc.output
    root = out / "selfee"
    final = load_file(str(out / "model.safetensors"))
    round_0 = load_file(str(root / "round_0" / "model" / "model.safetensors"))
    rejected = load_file(str(root / "round_1" / "rejected" / "attempt_1" / "model" / "model.safetensors"))
    assert final.keys() == round_0.keys() and len(final) > 10
    for name in final:
        assert torch.equal(final[name], round_0[name]), name
    assert any(not torch.equal(rejected[name], round_0[name]) for name in final)
