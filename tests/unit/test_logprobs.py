"""Judged log-probs in the precision users train in: float32 log-softmax and sums from bf16/fp16 logits."""

from __future__ import annotations

import pytest
import torch
from helpers import ANSWERS, MESSAGES, _lora, _sequences

from selfee_plugin.judge import score_sequences
from selfee_plugin.formatting import pad_token_id
from selfee_plugin.logprobs import Scorer, completion_logps, sequence_logps, token_budget_batches

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
    policy, ref, _, _ = score_sequences(model, _sequences(tiny_tokenizer, 8), Scorer(pad_token_id(tiny_tokenizer), 64))
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


def _shared_prompt_sequences(tokenizer):
    """Prompts of different lengths with 1-3 answers each (answers of different lengths), not grouped in order."""
    from selfee_plugin.formatting import format_completion, format_prompt, tokenize_completion

    prompts = [format_prompt(tokenizer, m) for m in MESSAGES]
    plan = [(0, 0), (1, 1), (0, 2), (2, 3), (3, 4), (2, 5), (0, 6), (1, 7), (2, 0)]
    return [tokenize_completion(tokenizer, prompts[p], format_completion(tokenizer, ANSWERS[a])) for p, a in plan]


def test_shared_prompts_give_the_full_forward_log_probs(tiny_model, tiny_tokenizer, monkeypatch):
    """Each prompt forwarded once for all of its answers (on its cached keys and values): the same summed log-probs
    as one full forward per answer, for the LoRA policy and with adapters off, in every token-budget batching."""
    import selfee_plugin.logprobs as logprobs

    model = _lora(tiny_model, seed=0).eval()
    sequences = _shared_prompt_sequences(tiny_tokenizer)
    full, full_lengths = completion_logps(model, sequences, tiny_tokenizer.pad_token_id)
    with model.disable_adapter():
        full_ref, _ = completion_logps(model, sequences, tiny_tokenizer.pad_token_id)

    def no_fallback(*args, **kwargs):
        raise AssertionError("shared_prompt_logps fell back to one forward per answer")

    monkeypatch.setattr(logprobs, "completion_logps", no_fallback)
    for budget in (16, 64, 4096):
        shared, lengths = logprobs.shared_prompt_logps(model, sequences, tiny_tokenizer.pad_token_id, budget)
        assert torch.equal(lengths, full_lengths)
        assert torch.allclose(shared, full, atol=1e-5, rtol=0), (budget, (shared - full).abs().max())
    with model.disable_adapter():
        shared_ref, _ = logprobs.shared_prompt_logps(model, sequences, tiny_tokenizer.pad_token_id)
    assert torch.allclose(shared_ref, full_ref, atol=1e-5, rtol=0) and not torch.allclose(shared_ref, full, atol=1e-3)


def test_shared_prompts_fall_back_where_nothing_is_shared_or_a_sequence_is_cut(tiny_model, tiny_tokenizer, monkeypatch):
    import selfee_plugin.logprobs as logprobs

    calls = []
    real = logprobs.completion_logps
    monkeypatch.setattr(logprobs, "completion_logps", lambda *a, **k: calls.append(k) or real(*a, **k))
    sequences = _shared_prompt_sequences(tiny_tokenizer)
    unique = _sequences(tiny_tokenizer, 4)  # four different prompts
    logprobs.shared_prompt_logps(tiny_model, unique, tiny_tokenizer.pad_token_id)
    cut, _ = logprobs.shared_prompt_logps(tiny_model, sequences, tiny_tokenizer.pad_token_id, max_length=12)
    assert len(calls) == 2 and calls[1]["max_length"] == 12
    assert torch.equal(cut, real(tiny_model, sequences, tiny_tokenizer.pad_token_id, max_length=12)[0])


@pytest.mark.parametrize("dtype", HALF)
def test_shared_prompts_in_half_precision_differ_only_by_batching_noise(tiny_model_dir, tiny_tokenizer, dtype):
    """In bf16/fp16 a prompt computed once differs from the full forward as differently batched forwards differ
    (measured on this model: bf16 2.5e-3 vs 3.1e-3 nats between batched and one-at-a-time; fp16 3.6e-4 vs 1.4e-3),
    far below the 0.2-4 nat margins SPA judges."""
    from transformers import AutoModelForCausalLM

    from selfee_plugin.logprobs import shared_prompt_logps

    model = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype), seed=0).eval()
    sequences = _shared_prompt_sequences(tiny_tokenizer) * 3
    full, _ = completion_logps(model, sequences, tiny_tokenizer.pad_token_id, 4096)
    shared, _ = shared_prompt_logps(model, sequences, tiny_tokenizer.pad_token_id, 4096)
    assert (shared - full).abs().max() <= 1e-2
