"""Tests for selfee_plugin.generation and .memory: sampling from the policy, batch sizing, the DPO text format."""

from __future__ import annotations

import torch

from selfee_plugin.config_blocks import GenerationConfig
from selfee_plugin.formatting import format_completion, format_preference_rows, format_prompt, tokenize_completion
from selfee_plugin.generation import generate_responses

PROMPTS = [
    [{"role": "user", "content": "sort 3 1 2"}],
    [{"role": "user", "content": "hello world the numbers"}],
    [{"role": "system", "content": "answer yes or no"}, {"role": "user", "content": "is 1 2"}],
    [{"role": "user", "content": "sort 9"}],
]


def _cfg(**kw):
    return GenerationConfig(**{"max_new_tokens": 6, "batch_size": 2, **kw})


def test_generates_n_answers_per_prompt_reproducibly(tiny_model, tiny_tokenizer):
    """Same seed -> same answers, another seed -> other answers; the caller's RNG stream is left untouched."""
    rng_before = torch.get_rng_state()
    first = generate_responses(tiny_model, tiny_tokenizer, PROMPTS, _cfg(), n=3, seed=1, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    again = generate_responses(tiny_model, tiny_tokenizer, PROMPTS, _cfg(), n=3, seed=1, progress=False)
    other = generate_responses(tiny_model, tiny_tokenizer, PROMPTS, _cfg(), n=3, seed=2, progress=False)
    assert [len(r) for r in first.responses] == [3] * len(PROMPTS)
    assert all(isinstance(t, str) and t == t.strip() for r in first.responses for t in r)
    assert first.responses == again.responses
    assert first.responses != other.responses
    assert first.prompts[2] == format_prompt(tiny_tokenizer, PROMPTS[2])
    assert first.skipped == {} and first.generated_tokens > 0


def test_left_padded_batch_matches_one_prompt_at_a_time(tiny_model, tiny_tokenizer):
    """At a near-zero temperature sampling is greedy, so batching (left padding, KV cache) must not change answers."""
    cold = {"temperature": 1e-4, "max_new_tokens": 8}
    batched = generate_responses(tiny_model, tiny_tokenizer, PROMPTS, _cfg(batch_size=4, **cold), 1, 0, progress=False)
    alone = generate_responses(tiny_model, tiny_tokenizer, PROMPTS, _cfg(batch_size=1, **cold), 1, 0, progress=False)
    assert batched.responses == alone.responses


def test_long_prompts_are_skipped_and_counted_not_truncated(tiny_model, tiny_tokenizer):
    limit = len(tiny_tokenizer(format_prompt(tiny_tokenizer, PROMPTS[3]))["input_ids"])
    out = generate_responses(tiny_model, tiny_tokenizer, PROMPTS, _cfg(max_prompt_length=limit), 2, 0, progress=False)
    assert out.skipped == {0: "prompt_too_long", 1: "prompt_too_long", 2: "prompt_too_long"}
    assert out.responses[:3] == [None, None, None] and out.finished[:3] == [None, None, None]
    assert len(out.responses[3]) == 2


def _force_token(model, token_id):
    """Make `token_id` the overwhelming next token, whatever the hidden state."""
    bias = torch.zeros(model.lm_head.out_features)
    bias[token_id] = 1e4
    return model.lm_head.register_forward_hook(lambda module, args, logits: logits + bias)


def test_stops_at_eos_and_caps_length(tiny_model, tiny_tokenizer):
    """A model that always emits EOS gives empty, finished answers; one that never does runs to max_new_tokens."""
    hook = _force_token(tiny_model, tiny_tokenizer.eos_token_id)
    out = generate_responses(tiny_model, tiny_tokenizer, PROMPTS[:2], _cfg(), 2, 0, progress=False)
    hook.remove()
    assert out.responses == [["", ""], ["", ""]]
    assert out.finished == [[True, True], [True, True]]
    assert out.generated_tokens == 4  # one EOS per answer, no padding counted

    hook = _force_token(tiny_model, tiny_tokenizer.convert_tokens_to_ids("yes"))
    out = generate_responses(tiny_model, tiny_tokenizer, PROMPTS[:2], _cfg(max_new_tokens=5), 2, 0, progress=False)
    hook.remove()
    assert out.responses == [["yes yes yes yes yes"] * 2] * 2
    assert out.finished == [[False, False]] * 2
    assert out.generated_tokens == 4 * 5


def test_restores_mode_and_padding_side_under_lora(tiny_model, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    model.base_model.model.model.layers[0].eval()  # a submodule the caller froze in eval mode stays so
    tiny_tokenizer.padding_side = "right"
    out = generate_responses(model, tiny_tokenizer, PROMPTS, _cfg(), 2, 0, progress=False)
    assert all(len(r) == 2 for r in out.responses)
    assert model.training and not model.base_model.model.model.layers[0].training
    assert model.base_model.model.model.layers[1].training
    assert tiny_tokenizer.padding_side == "right"


def test_text_format_matches_axolotl_chat_template_default(tiny_tokenizer):
    """Prompt and completion strings equal Axolotl's `chat_template.default` DPO strategy output."""
    from axolotl.prompt_strategies.dpo.chat_template import default

    transform, _ = default({"datasets": [{}]})
    row = {"messages": PROMPTS[2], "chosen": {"role": "assistant", "content": "yes 1 2"}, "rejected": "no"}
    expected = transform(row, tokenizer=tiny_tokenizer)
    assert format_prompt(tiny_tokenizer, PROMPTS[2]) == expected["prompt"]
    assert format_completion(tiny_tokenizer, "yes 1 2") == expected["chosen"] == "yes 1 2 <|end|>"
    assert format_completion(tiny_tokenizer, "no") == expected["rejected"]
    # Axolotl's find() hits the "a" inside "[[dummy_message]]"; ours cuts at the answer itself.
    assert format_completion(tiny_tokenizer, "a") == "a <|end|>"
    assert format_preference_rows([row], tiny_tokenizer) == [expected]


def test_tokenization_adds_eos_and_splits_at_prompt_length(tiny_tokenizer):
    prompt = format_prompt(tiny_tokenizer, PROMPTS[0])
    with_eos = tokenize_completion(tiny_tokenizer, prompt, "1 2 3 <|end|>")
    without = tokenize_completion(tiny_tokenizer, prompt, "1 2 3")
    assert with_eos == without
    prompt_ids, completion_ids = with_eos
    assert prompt_ids == tiny_tokenizer(prompt)["input_ids"]
    assert completion_ids[-1] == tiny_tokenizer.eos_token_id and len(completion_ids) == 4


# ----------------------------------------------------------------------------------------------- merged sampling


def test_merged_copy_generates_the_same_tokens_and_leaves_the_policy_alone(tiny_model, tiny_tokenizer):
    """Greedy decoding from the merged copy equals the unmerged LoRA model's, token for token (fp32); sampling with
    the same seed gives the same answers; the policy's weights, adapter and train flags are untouched."""
    from helpers import _lora

    from selfee_plugin.formatting import format_prompt
    from selfee_plugin.merging import merged_copy

    model = _lora(tiny_model, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_copy(model)
    ids = tiny_tokenizer([format_prompt(tiny_tokenizer, m) for m in PROMPTS[:1]], return_tensors="pt").input_ids
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tiny_tokenizer.pad_token_id}
    with torch.no_grad():
        model.eval()
        assert torch.equal(merged.generate(ids, **kwargs), model.generate(input_ids=ids, **kwargs))
        with model.disable_adapter():  # the adapter matters, so equality above is not the bare model's
            assert not torch.allclose(merged(ids).logits, model(input_ids=ids).logits)
    sampled = {m: generate_responses(model, tiny_tokenizer, PROMPTS, _cfg(merge_adapter=m), 2, 0).responses
               for m in (False, True)}
    assert sampled[True] == sampled[False]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.active_adapter == "default" and not any(getattr(m, "merged", False) for m in model.modules())


def test_merged_copy_of_a_4bit_model_dequantizes_the_base(tiny_model_dir, tiny_tokenizer):
    """QLoRA: the merged copy holds dequantized base + LoRA in the compute dtype; its logits equal the 4-bit model's."""
    from helpers import _lora
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from selfee_plugin.merging import merged_bytes, merged_copy
    from selfee_plugin.patches import bitsandbytes_cpu_weight_packing

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, quantization_config=quant)
    bitsandbytes_cpu_weight_packing.apply(base)
    model = _lora(base, seed=0).eval()
    merged = merged_copy(model)
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    assert merged_bytes(model) >= sum(p.numel() * p.element_size() for p in merged.parameters())
    ids = torch.tensor([[2, 5, 9, 11, 4]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- batch sizing


def test_out_of_memory_halves_the_batch_and_loses_or_repeats_no_prompt(tiny_model, tiny_tokenizer, monkeypatch):
    """A batch of more than 2 prompts runs out of memory: the sampler halves to 2, keeps that size, and every prompt
    is sampled exactly once."""
    from selfee_plugin.generation import HFSampler

    sampler = HFSampler(tiny_model, tiny_tokenizer, _cfg(batch_size=8))
    real, seen = HFSampler._generate_batch, []

    def small_memory(self, model, batch, *args):
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.extend(index for index, _ in batch)
        return real(self, model, batch, *args)

    monkeypatch.setattr(HFSampler, "_generate_batch", small_memory)
    prompts = PROMPTS * 3  # 12 prompts
    out = sampler.generate(prompts, n=2, seed=0)
    assert out.batch_prompts == sampler.batch_prompts == 2
    assert sorted(seen) == list(range(len(prompts)))  # each once
    assert all(r is not None and len(r) == 2 for r in out.responses)


def test_auto_batch_is_fixed_on_cpu_and_sized_from_the_config_on_an_accelerator():
    """On CPU `auto` is 64 sequences. The per-sequence estimate for Mistral-7B shapes at 150 + 300 tokens:
    KV 2 x 32 layers x 8 KV heads x 128 x 450 x 2 bytes = 58,982,400; sampling 6 x 32000 x 4 = 768,000;
    prefill 150 x (3 x 14336 + 4 x 4096) x 2 = 17,817,600."""
    from transformers import MistralConfig

    from selfee_plugin.config_blocks import CPU_AUTO_SEQUENCES
    from selfee_plugin.memory import auto_batch_sequences, sequence_bytes

    config = MistralConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                           num_attention_heads=32, num_key_value_heads=8)
    assert sequence_bytes(config, 450, 150) == 58_982_400 + 768_000 + 17_817_600
    cpu_model = torch.nn.Linear(2, 2)
    assert auto_batch_sequences(cpu_model, 150, 300) == CPU_AUTO_SEQUENCES == 64


def test_batches_split_the_prompts_evenly(tiny_model, tiny_tokenizer, monkeypatch):
    """10 prompts at batch_size 4 run as 4 + 3 + 3, not 4 + 4 + 2: each batch takes as many decode steps."""
    from selfee_plugin.generation import HFSampler

    sizes, real = [], HFSampler._generate_batch

    def record(self, model, batch, *args):
        sizes.append(len(batch))
        return real(self, model, batch, *args)

    monkeypatch.setattr(HFSampler, "_generate_batch", record)
    out = HFSampler(tiny_model, tiny_tokenizer, _cfg(batch_size=4)).generate((PROMPTS * 3)[:10], n=1, seed=0)
    assert sizes == [4, 3, 3] and all(r is not None for r in out.responses)
