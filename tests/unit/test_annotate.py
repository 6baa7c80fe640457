"""Tests for selfee_plugin.annotate: judged pairs on disk, metrics, resume after a crash, length-bias warning."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from helpers import BETA, MESSAGES, _dpo_trainer, _lora, _plain_logp

from selfee_plugin.annotate import annotate
from selfee_plugin.args import SelfeeConfig
from selfee_plugin.artifacts import SKIP_REASONS, judged_pairs_dataset, read_judged_rows
from selfee_plugin.diagnostics import summarize_judged_rows
from selfee_plugin.formatting import format_completion, tokenize_completion

# ----------------------------------------------------------------------------------------------- annotation


def _selfee_cfg(**judge):
    return SelfeeConfig(
        rounds=0, samples_per_prompt=2,
        generation={"max_new_tokens": 6, "batch_size": 2, "chunk_size": 2, "temperature": 1.0},
        judge={"batch_tokens": 64, **judge},
    )


def _prompts(k=6):
    return [(f"p{i}", MESSAGES[i % len(MESSAGES)]) for i in range(k)]


def test_annotate_writes_pairs_metrics_and_a_trainable_dataset(tiny_model, tiny_tokenizer, tmp_path):
    model = _lora(tiny_model, seed=0)
    path = str(tmp_path / "round_1" / "pairs.jsonl")
    metrics = annotate(model, tiny_tokenizer, _prompts(6), _selfee_cfg(), BETA, path)
    rows = read_judged_rows(path)
    assert [r["prompt_id"] for r in rows] == [f"p{i}" for i in range(6)]
    pairs = [r for r in rows if r["chosen_index"] is not None]
    assert metrics["selfee/pairs"] == len(pairs) > 0
    assert all(k.startswith("selfee/") and k == k.lower() and math.isfinite(v) for k, v in metrics.items())
    for key in ("seconds_generate", "seconds_judge", "generation_tokens_per_second", "judge_tokens_per_second",
                "margin_mean", "margin_std", "chosen_length_mean", "rejected_length_mean", "longer_chosen_fraction",
                "distinct_2", *(f"skipped_{r}" for r in SKIP_REASONS)):
        assert f"selfee/{key}" in metrics

    row = pairs[0]
    w, l = row["chosen_index"], row["rejected_index"]
    assert row["rewards"][w] > row["rewards"][l]
    assert row["probability"] == pytest.approx(1 / (1 + math.exp(-BETA * (row["rewards"][w] - row["rewards"][l]))))
    assert row["completions"][w] == format_completion(tiny_tokenizer, row["responses"][w])
    seq = tokenize_completion(tiny_tokenizer, row["prompt"], row["completions"][w])
    assert row["policy_logps"][w] == pytest.approx(_plain_logp(model, *seq), abs=1e-4)
    assert row["completion_lengths"][w] == len(seq[1])

    dataset = judged_pairs_dataset(read_judged_rows(path))
    assert dataset.column_names == ["prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps"]
    assert len(dataset) == len(pairs)
    assert dataset[0]["chosen"] == row["completions"][w] and dataset[0]["rejected"] == row["completions"][l]
    assert dataset[0]["prompt"] == row["prompt"]  # the dataset keeps the file's order
    with pytest.raises(ValueError, match=r"prompt ids \['q'\] appear more than once"):
        annotate(model, tiny_tokenizer, [("q", MESSAGES[0]), ("q", MESSAGES[1])], _selfee_cfg(), BETA, path)
    initial = judged_pairs_dataset(read_judged_rows(path), reference="initial")[0]
    assert (initial["ref_chosen_logps"], initial["ref_rejected_logps"]) == (row["ref_logps"][w], row["ref_logps"][l])

    # Through TRL: the columns reach the batch as the judged pi_cur. Handed a PEFT model, TRL 1.9 copies its adapter
    # to one named `ref` and scores the reference with it: that is pi_cur again, and must equal the judged values.
    trainer = _dpo_trainer(model, tiny_tokenizer, tmp_path / "trainer", dataset, new_lora=False)
    assert "ref" in trainer.model.peft_config
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    judged_cur = torch.tensor([[r["policy_logps"][r["chosen_index"]], r["policy_logps"][r["rejected_index"]]]
                               for r in pairs])
    torch.testing.assert_close(torch.stack([batch["ref_chosen_logps"], batch["ref_rejected_logps"]], 1), judged_cur)
    trl_cur = torch.stack(trainer.compute_ref_log_probs(trainer.model, batch), 1)
    torch.testing.assert_close(trl_cur, judged_cur, atol=1e-4, rtol=0)


def test_resume_after_a_crash_mid_judgment_loses_and_duplicates_nothing(tiny_model, tiny_tokenizer, tmp_path,
                                                                        monkeypatch):
    import selfee_plugin.logprobs as logprobs

    model = _lora(tiny_model, seed=0)
    cfg, prompts = _selfee_cfg(), _prompts(6)
    clean = str(tmp_path / "clean.jsonl")
    annotate(model, tiny_tokenizer, prompts, cfg, BETA, clean)

    real, calls = logprobs.completion_logps, []

    def crash_in_second_reference_pass(*args, **kwargs):
        # Forward passes go policy, reference per chunk: the 4th is the second chunk's reference, mid-judgment.
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    crashed = str(tmp_path / "crashed.jsonl")
    monkeypatch.setattr(logprobs, "completion_logps", crash_in_second_reference_pass)
    with pytest.raises(RuntimeError, match="simulated crash"):
        annotate(model, tiny_tokenizer, prompts, cfg, BETA, crashed)
    monkeypatch.undo()
    assert [r["prompt_id"] for r in read_judged_rows(crashed)] == ["p0", "p1"]
    with open(crashed, "a") as f:
        f.write('{"prompt_id": "p2", "messa')  # a row cut off mid-write

    metrics = annotate(model, tiny_tokenizer, prompts, cfg, BETA, crashed)
    assert metrics["selfee/prompts_resumed"] == 2
    resumed, expected = read_judged_rows(crashed), read_judged_rows(clean)
    assert [r["prompt_id"] for r in resumed] == [f"p{i}" for i in range(6)]
    assert resumed == expected  # chunks are seeded by their first prompt id, so the resumed run samples the same
    assert len(judged_pairs_dataset(read_judged_rows(crashed))) == len(judged_pairs_dataset(read_judged_rows(clean)))
    with open(crashed) as f:
        assert all(json.loads(line) for line in f)


def test_degenerate_answers_are_recorded_with_their_reason(tiny_model, tiny_tokenizer, tmp_path):
    """A model that always says EOS gives empty answers; a LoRA-free policy gives r = 0 for every answer: ties."""
    path = str(tmp_path / "empty.jsonl")
    bias = torch.zeros(tiny_model.lm_head.out_features)
    bias[tiny_tokenizer.eos_token_id] = 1e4
    model = _lora(tiny_model, seed=None)
    hook = tiny_model.lm_head.register_forward_hook(lambda m, a, logits: logits + bias)
    metrics = annotate(model, tiny_tokenizer, _prompts(3), _selfee_cfg(), BETA, path)
    hook.remove()
    assert metrics["selfee/skipped_empty_response"] == 3 and metrics["selfee/pairs"] == 0
    path = str(tmp_path / "ties.jsonl")
    metrics = annotate(model, tiny_tokenizer, _prompts(3), _selfee_cfg(), BETA, path)
    assert metrics["selfee/skipped_reward_tie"] == 3 and metrics["selfee/pairs"] == 0
    assert len(judged_pairs_dataset(read_judged_rows(path))) == 0


def test_length_bias_warning(selfee_logs):
    rows = [{"chosen_index": 0, "rejected_index": 1, "margin": 1.0, "probability": 0.52,
             "completion_lengths": [9, 3], "responses": ["a b c", "d"], "skip_reason": None}] * 9
    rows += [{"chosen_index": 1, "rejected_index": 0, "margin": 0.5, "probability": 0.51,
              "completion_lengths": [9, 3], "responses": ["a b c", "d"], "skip_reason": None}]
    metrics = summarize_judged_rows(rows, length_bias_warning=0.8)
    assert metrics["selfee/longer_chosen_fraction"] == pytest.approx(0.9)
    assert metrics["selfee/chosen_length_mean"] == pytest.approx(8.4)
    assert metrics["selfee/distinct_2"] == pytest.approx(0.1)  # 2 distinct bigrams ("a b", "b c") among 20
    assert "longer response" in selfee_logs.text and "main failure mode" in selfee_logs.text
    assert {r.levelno for r in selfee_logs.records} == {logging.WARNING}
    selfee_logs.clear()
    summarize_judged_rows(rows, length_bias_warning=0.95)
    assert "longer response" not in selfee_logs.text




def test_judge_share_prompts_judges_the_same_pairs(tiny_model, tiny_tokenizer, tmp_path):
    """`judge.share_prompts` (each prompt forwarded once for its answers): the same samples, log-probs within float
    error, the same chosen/rejected answers."""
    model = _lora(tiny_model, seed=0)
    rows = {}
    for share in (False, True):
        path = str(tmp_path / f"share_{share}.jsonl")
        annotate(model, tiny_tokenizer, _prompts(6), _selfee_cfg(share_prompts=share), BETA, path)
        rows[share] = read_judged_rows(path)
    assert [r["responses"] for r in rows[True]] == [r["responses"] for r in rows[False]]
    for shared, full in zip(rows[True], rows[False]):
        assert (shared["chosen_index"], shared["rejected_index"]) == (full["chosen_index"], full["rejected_index"])
        for key in ("policy_logps", "ref_logps"):
            if full[key] is not None:
                assert shared[key] == pytest.approx(full[key], abs=1e-5)
    assert any(r["chosen_index"] is not None for r in rows[True])
