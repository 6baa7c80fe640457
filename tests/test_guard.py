"""The round guard's rule, retry choice and length balancing, and the on-policy labels, on hand-made rows."""

from __future__ import annotations

import json

import pytest
import torch

from selfee_plugin.args import GuardConfig, LabelsConfig, SelfeeConfig
from selfee_plugin.guard import Attempt, balance_lengths, retry_attempt, verdict
from selfee_plugin.labels import LabelsNeeded, apply_labels, label_count, round_labels, select_for_labels


def _row(pid, lengths, chosen=0, probability=0.6):
    return {"prompt_id": pid, "messages": [{"role": "user", "content": f"q{pid}"}], "responses": ["a", "b"],
            "completion_lengths": lengths, "chosen_index": chosen, "rejected_index": 1 - chosen,
            "probability": probability}


def test_verdict_names_each_rule_that_fires():
    guard = GuardConfig()
    assert verdict({"selfee/logps_drift_chosen_per_token": 0.02, "selfee/length_growth": 0.5}, {}, guard) == []
    fell = verdict({"selfee/logps_drift_chosen_per_token": -0.05}, {}, guard)
    assert len(fell) == 1 and "fell by 0.050 nats/token" in fell[0] and "guard.min_chosen_drift" in fell[0]
    # Growth alone is not harm; growth while the judge preferred longer answers is.
    grew = {"selfee/logps_drift_chosen_per_token": 0.01, "selfee/length_growth": 0.3}
    assert verdict(grew, {"selfee/unequal_length_pairs": 20, "selfee/longer_chosen_fraction": 0.4}, guard) == []
    assert verdict(grew, {"selfee/unequal_length_pairs": 5, "selfee/longer_chosen_fraction": 0.9}, guard) == []
    reasons = verdict(grew, {"selfee/unequal_length_pairs": 20, "selfee/longer_chosen_fraction": 0.9}, guard)
    assert len(reasons) == 1 and "+30%" in reasons[0] and "90%" in reasons[0]
    assert verdict({**grew, "selfee/length_growth": 0.2}, {"selfee/unequal_length_pairs": 20,
                                                          "selfee/longer_chosen_fraction": 0.9}, guard) == []
    # Chosen rose, but the margin came mostly from pushing the rejected answers down.
    assert verdict({"selfee/logps_drift_chosen_per_token": 0.02, "selfee/logps_drift_ratio": 2.9}, {}, guard) == []
    pushed = verdict({"selfee/logps_drift_chosen_per_token": 0.02, "selfee/logps_drift_ratio": 7.5}, {}, guard)
    assert len(pushed) == 1 and "7.5x" in pushed[0] and "guard.max_drift_ratio 3" in pushed[0]
    labels = verdict({"selfee/judge_accuracy_on_policy": 0.3}, {}, guard)
    assert len(labels) == 1 and "30%" in labels[0]


def test_retry_halves_the_step_and_balances_lengths_when_the_judge_leaned_longer():
    selfee = SelfeeConfig(rounds=0, guard={"lr_scale": 0.25})
    leaning = {"selfee/unequal_length_pairs": 40, "selfee/longer_chosen_fraction": 0.6}
    assert retry_attempt(leaning, selfee) == Attempt(2, lr_scale=0.25, length_balanced=True)
    few = {"selfee/unequal_length_pairs": 3, "selfee/longer_chosen_fraction": 1.0}
    assert retry_attempt(few, selfee) == Attempt(2, lr_scale=0.25)
    assert Attempt(2, lr_scale=0.25).describe() == "learning rate x0.25"
    assert Attempt(2, 0.5, True).describe() == "length-balanced pairs and learning rate x0.5"


def test_balance_lengths_keeps_equal_pairs_and_as_many_shorter_as_longer_chosen():
    rows = [
        _row("eq", [3, 3]),
        _row("L1", [5, 3], probability=0.9), _row("L2", [6, 3], probability=0.7), _row("L3", [4, 2], probability=0.8),
        _row("S1", [2, 4], probability=0.55),
        {**_row("none", [1, 1]), "chosen_index": None, "rejected_index": None},
    ]
    kept = [row["prompt_id"] for row in balance_lengths(rows)]
    assert kept == ["eq", "L1", "S1"]  # the most confident longer-chosen pair only, order of the file


def test_labels_pick_unequal_length_then_least_sure_pairs():
    rows = [_row("a", [3, 3], probability=0.51), _row("b", [4, 3], probability=0.9), _row("c", [2, 3], probability=0.6),
            {**_row("d", [1, 1]), "chosen_index": None}]
    assert [r["prompt_id"] for r in select_for_labels(rows, 3)] == ["c", "b", "a"]
    # A share counts the round's prompts, skipped ones included; never more than its pairs.
    assert label_count(0.05, 400, 350) == 20 and label_count(0.001, 10, 10) == 1 and label_count(7, 8, 5) == 5
    assert label_count(0.5, 400, 150) == 150 and label_count(0, 400, 400) == 0


def test_labels_swap_drop_and_measure_the_judge():
    rows = [_row("a", [3, 3]), _row("b", [4, 3]), _row("c", [2, 3]), _row("d", [2, 2])]
    out, metrics = apply_labels(rows, {"a": "chosen", "b": "rejected", "c": "tie"})
    assert (out[1]["chosen_index"], out[1]["rejected_index"]) == (1, 0)
    assert out[2]["chosen_index"] is None and out[3] is rows[3] and rows[1]["chosen_index"] == 0
    assert metrics == {"selfee/labels": 3.0, "selfee/labels_flipped": 1.0, "selfee/judge_accuracy_on_policy": 0.5}


def labeller(messages, chosen, rejected):
    """A stand-in for a gold score: prefers the answer `b`."""
    return "rejected" if rejected == "b" else "chosen"


def test_a_labeller_function_labels_once_and_a_person_is_asked_then_read(tmp_path):
    rows = [_row(str(i), [3, 3], probability=0.5 + i / 100) for i in range(10)]
    cfg = LabelsConfig(per_round=0.2, function=f"{__name__}:labeller")
    labels = round_labels(rows, cfg, tmp_path)
    assert labels == {"0": "rejected", "1": "rejected"}  # the two least sure pairs; `b` is each one's rejected
    exported = [json.loads(line) for line in open(tmp_path / "to_label.jsonl")]
    assert [r["label"] for r in exported] == ["rejected", "rejected"] and exported[0]["messages"] == rows[0]["messages"]

    person = tmp_path / "person"
    person.mkdir()
    with pytest.raises(LabelsNeeded, match=r"2 of this round's pairs are waiting for labels .*to_label.jsonl"):
        round_labels(rows, LabelsConfig(per_round=2), person)
    lines = [json.loads(line) for line in open(person / "to_label.jsonl")]
    lines[0]["label"] = "tie"
    (person / "to_label.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(LabelsNeeded, match=r"1 of 2 pair\(s\) .*\(line 2: label None\)"):
        round_labels(rows, LabelsConfig(per_round=2), person)
    lines[1]["label"] = "chosen"
    (person / "to_label.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert round_labels(rows, LabelsConfig(per_round=2), person) == {"0": "tie", "1": "chosen"}


@pytest.mark.parametrize("spec", ["no_colon", "a:b:c", ":f"])
def test_labels_function_must_be_module_colon_callable(spec):
    with pytest.raises(ValueError, match="module.path:callable"):
        LabelsConfig(function=spec)


def _tiny_rounds_cfg(model_dir, data_dir, out, **selfee):
    from conftest import tiny_train_config

    block = {
        "rounds": [6, 6], "seed_epochs": 1,
        "prompts": [{"path": f"{data_dir}/prompts.jsonl", "ds_type": "json", "type": "prompt"}],
        "generation": {"max_new_tokens": 8, "batch_size": 4, "chunk_size": 4, "temperature": 1.0},
        "judge": {"batch_tokens": 256}, "guard": {"probe_prompts": 4}, **selfee,
    }
    return tiny_train_config(model_dir, data_dir, str(out), selfee=block)


def _lora_weights(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


@pytest.mark.e2e
def test_a_firing_guard_retries_then_stops_at_the_last_good_round(tiny_model_dir, tiny_data_dir, tmp_path):
    """A rule no round can pass (chosen log-probs must rise by 100 nats/token): round 1 is trained, rejected,
    retried at half the learning rate, rejected again, and the loop stops with round 0's policy as the final model;
    round 2 never runs, and a rerun trains nothing."""
    from conftest import run_axolotl_train

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


@pytest.mark.e2e
def test_labels_stop_the_run_then_a_rerun_trains_with_them(tiny_model_dir, tiny_data_dir, tmp_path):
    """`selfee.labels` without a function: round 1 is judged, 2 of its pairs are exported and the run stops asking for
    labels; with labels filled in, the same command continues: the judge's agreement is measured, a `rejected` label
    swaps its pair in the training data, round 1 finishes and round 2 asks for its own labels."""
    from conftest import run_axolotl_train

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


@pytest.mark.e2e
def test_a_firing_guard_under_full_fine_tuning_restores_the_whole_model(tiny_model_dir, tiny_data_dir, tmp_path):
    """Full fine-tuning (the paper's setting): the guard restores every weight of pi_{t-1}, not an adapter. The final
    model Axolotl saves equals round 0's saved policy, and the rejected attempt differs from it."""
    from conftest import run_axolotl_train
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
