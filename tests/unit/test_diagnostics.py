"""Round diagnostics: the post-round signals on hand-made rows, and on a real annotation re-scored unchanged."""

from __future__ import annotations

import pytest
from helpers import BETA, MESSAGES, _lora

from selfee_plugin.diagnostics import post_round_signals


def test_post_round_signals_by_hand():
    """Row A: pair (0 chosen, 1 rejected); before [-10, -12], init [-11, -11], after [-9, -14]:
    drift_w = 1, drift_l = -2, KL terms (before - after) = -1, 2; r_after = [2, -3] -> agrees.
    Row B: pair (1 chosen, 0 rejected); before [-5, -4], init [-5, -5], after [-4, -6]: drift_w = -2, drift_l = 1,
    KL terms -1, 2; r_after = [1, -1]: the chosen (index 1) is now lower -> disagrees. Row C is unjudged.
    Per token: chosen answers have 4 and 6 tokens, rejected 2 and 3."""
    rows = [
        {"policy_logps": [-10.0, -12.0], "ref_logps": [-11.0, -11.0], "chosen_index": 0, "rejected_index": 1,
         "completion_lengths": [4, 2]},
        {"policy_logps": [-5.0, -4.0], "ref_logps": [-5.0, -5.0], "chosen_index": 1, "rejected_index": 0,
         "completion_lengths": [3, 6]},
        {"policy_logps": None, "ref_logps": None, "chosen_index": None, "rejected_index": None},
    ]
    after = [[-9.0, -14.0], [-4.0, -6.0], None]
    signals = post_round_signals(rows, after)
    assert signals["selfee/logps_drift_chosen"] == pytest.approx((1 - 2) / 2)
    assert signals["selfee/logps_drift_rejected"] == pytest.approx((-2 + 1) / 2)
    assert signals["selfee/logps_drift_chosen_per_token"] == pytest.approx((1 - 2) / (4 + 6))
    assert signals["selfee/logps_drift_rejected_per_token"] == pytest.approx((-2 + 1) / (2 + 3))
    assert signals["selfee/kl_previous"] == pytest.approx((-1 + 2 - 1 + 2) / 4)
    assert signals["selfee/judge_agreement_after"] == pytest.approx(0.5)
    assert signals["selfee/reward_after_mean"] == pytest.approx((2 - 3 + 1 - 1) / 4)
    # The chosen answers fell on net: the drift ratio (rejected fell / chosen rose) is not defined.
    assert "selfee/logps_drift_ratio" not in signals


def test_drift_ratio_is_how_far_rejected_fell_per_chosen_gain():
    """One pair: chosen 2 tokens rose 0.2 (0.1/token), rejected 4 tokens fell 1.6 (0.4/token): ratio 4."""
    rows = [{"policy_logps": [-3.0, -5.0], "ref_logps": [-3.0, -5.0], "chosen_index": 0, "rejected_index": 1,
             "completion_lengths": [2, 4]}]
    signals = post_round_signals(rows, [[-2.8, -6.6]])
    assert signals["selfee/logps_drift_ratio"] == pytest.approx(4.0)


def test_rescoring_an_unchanged_policy_gives_no_drift(tiny_model, tiny_tokenizer, tmp_path):
    """Re-scoring the judged rows with the very policy that judged them: zero drift and KL, full agreement."""
    from selfee_plugin.annotate import annotate
    from selfee_plugin.args import SelfeeConfig
    from selfee_plugin.artifacts import read_judged_rows
    from selfee_plugin.formatting import pad_token_id
    from selfee_plugin.judge import rescore_rows
    from selfee_plugin.logprobs import Scorer

    model = _lora(tiny_model, seed=0)
    cfg = SelfeeConfig(rounds=0, generation={"max_new_tokens": 6, "batch_size": 4, "temperature": 1.0})
    prompts = [(f"p{i}", MESSAGES[i % len(MESSAGES)]) for i in range(6)]
    path = str(tmp_path / "pairs.jsonl")
    annotate(model, tiny_tokenizer, prompts, cfg, BETA, path)
    rows = read_judged_rows(path)
    after = rescore_rows(model, tiny_tokenizer, rows, Scorer(pad_token_id(tiny_tokenizer), 32))
    assert [a is None for a in after] == [not r["completions"] for r in rows]
    signals = post_round_signals(rows, after)
    assert any(r["chosen_index"] is not None for r in rows)
    assert abs(signals["selfee/logps_drift_chosen"]) < 1e-4 and abs(signals["selfee/kl_previous"]) < 1e-4
    assert signals["selfee/judge_agreement_after"] == 1.0
