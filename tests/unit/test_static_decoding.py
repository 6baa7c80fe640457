"""Tests for selfee_plugin.static_decoding: the static-cache decoder samples exactly what `generate` samples, and is
used only where it does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import _lora

from selfee_plugin import static_decoding
from selfee_plugin.config_blocks import GenerationConfig
from selfee_plugin.generation import HFSampler
from selfee_plugin.static_decoding import StaticDecoder, static_decode_supported

PROMPTS = [
    [{"role": "user", "content": "sort 3 1 2"}],
    [{"role": "user", "content": "hello world the numbers"}],
    [{"role": "system", "content": "answer yes or no"}, {"role": "user", "content": "is 1 2"}],
    [{"role": "user", "content": "sort 9"}],
]
KWARGS = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "top_k": 0, "max_new_tokens": 20,
          "num_return_sequences": 3, "eos_token_id": [1], "pad_token_id": 0, "use_cache": True}
ROPE = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}


def _gqa_mistral():
    """A tiny random Mistral with grouped-query attention (8 query heads over 2 KV heads)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=8, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                           bos_token_id=2)
    return MistralForCausalLM(config).eval()


def _tiny(model_type, **extra):
    """A tiny random decoder of `model_type`: 2 layers, hidden 64, 4 query heads over 2 KV heads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                  intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                  eos_token_id=1, bos_token_id=3, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def _left_padded_prompts(prompts=5):
    ids = torch.randint(3, 300, (prompts, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[prompts - 2, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _bias_tokens(model, tokens, value):
    """Make `tokens` likelier by `value` logits (EOS: some answers stop early and are padded)."""
    bias = torch.zeros(model.get_output_embeddings().out_features)
    bias[tokens] = value
    return model.get_output_embeddings().register_forward_hook(lambda module, args, logits: logits + bias)


def _both(model, ids, mask, kwargs):
    """`generate`'s and the static decoder's new tokens from the same seed (no CUDA graphs: CPU)."""
    with torch.no_grad():
        torch.manual_seed(1)
        expected = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1] :]
        torch.manual_seed(1)
        sampled = StaticDecoder(graphs=False).sample(model, ids, mask, kwargs)
    return expected, sampled


def test_static_decoder_draws_the_same_tokens_as_hf_generate(monkeypatch):
    """The static loop (preallocated cache, GQA decode attention, each prompt prefilled once in chunks, no graphs
    on CPU) samples exactly what `generate` samples with the same seed: temperature, top-p, padding after EOS."""
    model = _gqa_mistral()
    ids, mask = _left_padded_prompts()
    hook = _bias_tokens(model, [1], 3.0)
    monkeypatch.setattr(static_decoding, "PREFILL_TOKENS", 20)  # two prompts per prefill forward
    expected, sampled = _both(model, ids, mask, KWARGS)
    hook.remove()
    assert torch.equal(sampled, expected)
    assert (sampled == 1).any() and (sampled == 0).any()  # stops and padding were exercised


@pytest.mark.parametrize("model_type, extra", [
    ("llama", {"rope_parameters": ROPE}),
    ("mistral", {"sliding_window": 32}),
    ("qwen2", {"sliding_window": 32, "use_sliding_window": True, "max_window_layers": 1, "rope_parameters": ROPE}),
    ("qwen3", {"sliding_window": 32, "use_sliding_window": True, "max_window_layers": 1, "head_dim": 8}),
], ids=["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_static_decoder_equals_generate_across_architectures(model_type, extra, lora):
    """Token for token with `generate` for each supported model type: grouped-query attention, several EOS ids,
    linear rope scaling, a sliding window that never cuts in (on Qwen one layer full, one sliding), and a LoRA
    adapter with non-zero B matrices."""
    model = _tiny(model_type, **extra)
    if lora:
        model = _lora(model, seed=0).eval()
    ids, mask = _left_padded_prompts(3)
    kwargs = {**KWARGS, "max_new_tokens": 16, "num_return_sequences": 2, "eos_token_id": [1, 2]}
    assert static_decode_supported(model, ids.shape[1] + kwargs["max_new_tokens"])
    hook = _bias_tokens(model, [1, 2], 2.0)
    expected, sampled = _both(model, ids, mask, kwargs)
    hook.remove()
    assert torch.equal(sampled, expected)
    assert (sampled == 1).any() and (sampled == 2).any() and (sampled == 0).any()  # both stops, padding


def test_gqa_decode_attention_equals_transformers_sdpa():
    """One query token under grouped-query attention with a padding mask: the folded heads give transformers' result."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from selfee_plugin.static_decoding import gqa_decode_attention

    module = _gqa_mistral().model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(3, h, s, 8, generator=gen) for h, s in ((8, 1), (2, 7), (2, 7)))
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., :3] = False
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    got, _ = gqa_decode_attention(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(got, expected)


def test_static_decoding_is_used_only_where_it_is_plain_causal_attention(tiny_model):
    model = _gqa_mistral()  # sliding_window 4096 by default
    assert static_decode_supported(model, 4096) and not static_decode_supported(model, 4097)
    assert static_decode_supported(tiny_model, 10_000)  # Llama: no window
    tiny_model.config._attn_implementation = "eager"
    assert not static_decode_supported(tiny_model, 10)


def _config(model_type="llama", attention="sdpa", **extra):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **extra)
    config._attn_implementation = attention
    return SimpleNamespace(config=config)


@pytest.mark.parametrize("model, supported", [
    (_config(), True),
    (_config("mistral", sliding_window=29), True),
    (_config("mistral", sliding_window=28), False),  # the window would cut into a 29-token sequence
    (_config("qwen2", sliding_window=16, use_sliding_window=True), False),
    (_config(attention="eager"), False),
    (_config(attention="flash_attention_2"), False),
    (_config(is_encoder_decoder=True), False),
    (_config("gpt2"), False),
], ids=["llama", "window-fits", "window-cuts", "qwen2-window-cuts", "eager", "flash", "encoder-decoder", "gpt2"])
def test_only_plain_causal_sdpa_configs_are_supported(model, supported):
    assert static_decode_supported(model, 29) is supported


@pytest.mark.parametrize("setting", [
    {"suppress_tokens": [5]}, {"begin_suppress_tokens": [5]}, {"bad_words_ids": [[5]]},
    {"sequence_bias": {(5,): -1.0}}, {"forced_eos_token_id": 1}, {"epsilon_cutoff": 1e-3},
    {"exponential_decay_length_penalty": (2, 1.1)}, {"renormalize_logits": True},
], ids=lambda setting: next(iter(setting)))
def test_a_generation_config_processor_refuses_static_decoding(setting):
    """A checkpoint's generation config that makes `generate` process the logits beyond temperature and top-p."""
    model = _tiny("llama")
    ids, _ = _left_padded_prompts(2)
    decoder = StaticDecoder(graphs=False, device_types=("cpu",))
    assert decoder.supports(model, ids, KWARGS)
    for key, value in setting.items():
        setattr(model.generation_config, key, value)
    assert not decoder.supports(model, ids, KWARGS)


def test_kwargs_override_the_checkpoints_sampling_knobs():
    """A checkpoint's top_k or repetition_penalty is overridden by the sampler's kwargs, as generate merges them."""
    model = _tiny("llama")
    ids, _ = _left_padded_prompts(2)
    model.generation_config.top_k, model.generation_config.repetition_penalty = 50, 1.3
    kwargs = {**KWARGS, "repetition_penalty": 1.0}
    decoder = StaticDecoder(graphs=False, device_types=("cpu",))
    assert decoder.supports(model, ids, kwargs)
    assert not decoder.supports(model, ids, KWARGS) and not decoder.supports(model, ids, {**kwargs, "top_k": 50})
    assert not StaticDecoder().supports(model, ids, kwargs)  # by default CPU batches use generate


def _counting_sampler(model, tokenizer, monkeypatch):
    """An HFSampler whose static decoder also runs on CPU, and the list of batches it decoded."""
    sampler = HFSampler(model, tokenizer, GenerationConfig(max_new_tokens=6, batch_size=2))
    sampler.static_decoder = StaticDecoder(graphs=False, device_types=("cpu",))
    calls, real = [], StaticDecoder.sample

    def sample(self, model, input_ids, *args):
        calls.append(input_ids.shape[0])
        return real(self, model, input_ids, *args)

    monkeypatch.setattr(StaticDecoder, "sample", sample)
    return sampler, calls


def test_sampler_answers_are_the_same_with_the_static_decoder(tiny_model, tiny_tokenizer, monkeypatch):
    with_generate = HFSampler(tiny_model, tiny_tokenizer, GenerationConfig(max_new_tokens=6, batch_size=2))
    expected = with_generate.generate(PROMPTS, n=2, seed=3)
    sampler, calls = _counting_sampler(tiny_model, tiny_tokenizer, monkeypatch)
    out = sampler.generate(PROMPTS, n=2, seed=3)
    assert calls == [2, 2]
    assert out.responses == expected.responses and out.finished == expected.finished


@pytest.mark.parametrize("refusal", ["suppress_tokens", "eager_attention"])
def test_sampler_uses_generate_where_the_static_decoder_would_sample_otherwise(tiny_model, tiny_tokenizer,
                                                                               monkeypatch, refusal):
    yes = tiny_tokenizer.convert_tokens_to_ids("yes")
    if refusal == "suppress_tokens":
        tiny_model.generation_config.suppress_tokens = [yes]
    else:
        tiny_model.config._attn_implementation = "eager"
    sampler, calls = _counting_sampler(tiny_model, tiny_tokenizer, monkeypatch)
    hook = _bias_tokens(tiny_model, [yes], 1e4)  # without suppression every answer would be "yes ..."
    out = sampler.generate(PROMPTS, n=2, seed=0)
    hook.remove()
    assert calls == [] and all(len(r) == 2 for r in out.responses)
    if refusal == "suppress_tokens":
        assert not any("yes" in answer for answers in out.responses for answer in answers)


def test_failed_graph_capture_falls_back_to_eager_steps_and_is_not_retried(monkeypatch):
    """Capture fails (here: no CUDA): one warning, graphs off for the decoder from then on, and the same tokens as
    eager decoding."""
    model = _gqa_mistral()
    ids, mask = _left_padded_prompts()
    kwargs = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "num_return_sequences": 2,
              "eos_token_id": [1], "pad_token_id": 0}
    captures, capture = [], static_decoding._capture_step
    monkeypatch.setattr(static_decoding, "_capture_step", lambda step: captures.append(1) or capture(step))
    torch.manual_seed(0)
    eager = StaticDecoder(graphs=False).sample(model, ids, mask, kwargs)
    decoder = StaticDecoder(graphs=True)
    torch.manual_seed(0)
    fallback = decoder.sample(model, ids, mask, kwargs)
    assert torch.equal(fallback, eager) and decoder.graphs is False
    decoder.sample(model, ids, mask, kwargs)
    assert len(captures) == 1
