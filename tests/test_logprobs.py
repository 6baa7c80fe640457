"""Judged log-probs in the precision users train in: float32 log-softmax and sums from bf16/fp16 logits."""

from __future__ import annotations

import pytest
import torch
from helpers import BETA, _lora, _sequences

from selfee_plugin.judge import score_sequences
from selfee_plugin.logprobs import completion_logps, sequence_logps, token_budget_batches

HALF = [torch.bfloat16, torch.float16]


def _float64_logps(logits, labels, mask):
    """Independent: log-softmax, gather and sum all in float64."""
    per_token = logits.double().log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    return (per_token * mask).sum(1)


@pytest.mark.parametrize("dtype", HALF)
def test_sums_of_300_tokens_over_32k_vocab_match_float64(dtype):
    """A 7B-sized case: 300 completion tokens, 32K vocabulary. The half-precision sum (TRL 1.9's path for bf16/fp16
    logits) is off by far more than SPA's reward margins; the float32 path stays within 1e-3 nats."""
    from trl.trainer.utils import selective_log_softmax

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 300, 32000, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, 32000, (2, 300), generator=gen)
    mask = torch.ones(2, 300)
    exact = _float64_logps(logits, labels, mask)
    torch.testing.assert_close(sequence_logps(logits, labels, mask).double(), exact, atol=1e-3, rtol=0)
    half_sum = selective_log_softmax(logits, labels).sum(1).double()
    assert (half_sum - exact).abs().max() > 0.05  # why this module exists


def test_token_budget_batches_cover_every_index_once_within_budget():
    lengths = [5, 30, 12, 12, 40, 3, 7]
    batches = token_budget_batches(lengths, max_tokens=40)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= 40


@pytest.mark.parametrize("dtype", HALF)
def test_judged_rewards_of_a_half_precision_model_match_float64(tiny_model_dir, tiny_tokenizer, dtype, monkeypatch):
    """Policy (LoRA) and reference (adapters off) log-probs of a bf16/fp16 model, judged in padded batches: every
    summed log-prob equals a float64 computation from the very logits the judge saw within 5e-4 nats (so each reward
    within 1e-3); the values are off the half-precision grid and distinct answers do not tie."""
    import selfee_plugin.logprobs as logprobs
    from transformers import AutoModelForCausalLM

    model = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype), seed=0).eval()
    assert model.get_output_embeddings().weight.dtype == dtype
    real, errors = logprobs.sequence_logps, []

    def checked(logits, labels, mask, *args):
        assert logits.dtype == dtype
        ours = real(logits, labels, mask, *args)
        errors.append((ours.double() - _float64_logps(logits, labels, mask)).abs().max().item())
        return ours

    monkeypatch.setattr(logprobs, "sequence_logps", checked)
    policy, ref, _, _ = score_sequences(model, tiny_tokenizer, _sequences(tiny_tokenizer, 8), None, max_tokens=64)
    assert len(errors) >= 4 and max(errors) <= 5e-4
    rewards = policy.double() - ref.double()
    assert len(set(rewards.tolist())) == len(rewards)  # no ties among distinct answers
    assert not torch.all((policy * 64) == (policy * 64).round())  # not multiples of 1/64


@pytest.mark.parametrize("dtype", HALF)
def test_same_batches_give_float64_exact_sums(tiny_model_dir, tiny_tokenizer, dtype):
    """With the same batch (no padding difference), the judged sums equal float64 sums of the very same logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    sequences = _sequences(tiny_tokenizer, 1)
    (logp,), _ = completion_logps(model, sequences, tiny_tokenizer.pad_token_id)
    prompt_ids, completion_ids = sequences[0]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, logits_to_keep=len(completion_ids) + 1).logits[:, :-1]
    exact = _float64_logps(logits, ids[:, -len(completion_ids):], torch.ones(1, len(completion_ids)))[0]
    assert abs(logp.item() - exact.item()) <= 1e-3
