"""The round guard's rule, retry choice and length balancing, and the on-policy labels, on hand-made rows. Through
the CLI: tests/e2e/test_guard_e2e.py."""

from __future__ import annotations

import json

import pytest

from selfee_plugin.args import SelfeeConfig
from selfee_plugin.config_blocks import GuardConfig, LabelsConfig
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
