"""A hand-written sampler for plain causal decoders: a preallocated KV cache, grouped-query decode attention and,
on CUDA, each decode step replayed as one graph. On the batches `StaticDecoder.supports`, it samples exactly what
`model.generate` would."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ._logging import get_logger
from .memory import is_out_of_memory

LOG = get_logger(__name__)

# Model types whose decoder layers are plain causal attention over a standard KV cache and accept a prepared 4D mask:
# `StaticDecoder` drives them. Others (hybrid, encoder-decoder, windows shorter than the batch) use HF generate.
STATIC_DECODE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
# The logits processors of `generate` that `StaticDecoder.sample` applies itself (temperature, then top-p).
STATIC_PROCESSORS = {"TemperatureLogitsWarper", "TopPLogitsWarper"}
GQA_DECODE_ATTENTION = "selfee_gqa_sdpa"
# Prompt tokens per prefill forward of the static loop: bounds its activations whatever the batch.
PREFILL_TOKENS = 8192


def static_decode_supported(model, total_tokens: int) -> bool:
    """Whether `model`'s attention is plain causal SDPA over a standard cache for sequences of up to `total_tokens`
    (prompt + answer): what `StaticDecoder` and a prompt's cache shared by its completions rely on."""
    config = model.config
    if (config.model_type not in STATIC_DECODE_MODEL_TYPES or getattr(config, "is_encoder_decoder", False)
            or config._attn_implementation != "sdpa"):
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or window >= total_tokens  # the window never cuts in: plain causal attention


def generate_processors(model, kwargs: dict) -> set[str]:
    """Class names of the logits processors `model.generate(**kwargs)` builds: `kwargs` over the model's generation
    config, merged as generate merges them (`suppress_tokens`, `bad_words_ids`, ... of a checkpoint included).

    Asks transformers' private `GenerationMixin._prepare_generation_config`, `_prepare_special_tokens` and
    `_get_logits_processor` (transformers 5.16), so that a new processor is refused rather than silently skipped.
    """
    config, _ = model._prepare_generation_config(None, **kwargs)
    model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device="cpu")
    processors = model._get_logits_processor(config, input_ids_seq_length=1, device="cpu")
    return {type(processor).__name__ for processor in processors}


def gqa_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' SDPA attention, except for one new token per sequence under grouped-query attention.

    With a padding mask, transformers copies every KV head once per query head before calling SDPA (torch's GQA
    kernels take no mask): the whole cache, several times over, at every decode step. With a single query token, the
    query heads that share a KV head can stand in for query positions of that head instead: the same attention,
    reading the cache once.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    if q_len != 1 or groups == 1 or dropout or (attention_mask is not None and attention_mask.shape[1] != 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, heads // groups, groups, dim), key, value, attn_mask=attention_mask, scale=scaling
    )  # (B, KV heads, groups, D): query head h = kv * groups + g, as transformers' repeat_kv orders them
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


@contextmanager
def _gqa_decode_attention(model):
    # transformers internals are imported where decoding starts: seconds of import for code that may never run.
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(GQA_DECODE_ATTENTION, gqa_decode_attention)
    AttentionMaskInterface.register(GQA_DECODE_ATTENTION, sdpa_mask)
    config, before = model.config, model.config._attn_implementation
    config._attn_implementation = GQA_DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


class _StaticKVCache:
    """A KV cache preallocated for the batch's longest sequence and written in place at `slots`, so that every decode
    step reads and writes the same addresses (what a CUDA graph replays). The model only calls `update`: positions
    and the 4D mask are passed to it explicitly.

    During prefill (`rows` set) each prompt's states are written to the rows of its `copies` samples and returned as
    they are, so the prompt is computed once and attends over its own length only.
    """

    def __init__(self, batch: int, length: int, copies: int):
        self.batch, self.length, self.copies = batch, length, copies
        self.keys, self.values, self.slots, self.rows = {}, {}, None, None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx not in self.keys:
            _, heads, _, dim = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros(self.batch, heads, self.length, dim)
            self.values[layer_idx] = value_states.new_zeros(self.batch, heads, self.length, value_states.shape[-1])
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.rows is not None:
            keys[self.rows].index_copy_(2, self.slots, key_states.repeat_interleave(self.copies, 0))
            values[self.rows].index_copy_(2, self.slots, value_states.repeat_interleave(self.copies, 0))
            return key_states, value_states
        keys.index_copy_(2, self.slots, key_states)
        values.index_copy_(2, self.slots, value_states)
        return keys, values


def _capture_step(step):
    """A CUDA graph of `step()` and its output tensor (refreshed by each replay). The first call runs eagerly on a
    side stream so that libraries create their handles and workspaces outside the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()
    return graph, output


class StaticDecoder:
    """Samples with the static loop where it draws what `model.generate(**kwargs)` would, across a sampler's batches.

    HF generate spends most of a large model's decode step in Python (per-module overhead of quantized + LoRA layers,
    masks, cache growth) while the GPU idles; a CUDA graph replays the step's kernels with no Python in between.

    Attributes:
        graphs: replay each decode step as one CUDA graph; turned off (with one warning) when a capture fails, so a
            failing capture is not retried every batch.
        device_types: devices it is used on: CUDA, where that overhead dominates; elsewhere `generate` samples.
    """

    def __init__(self, graphs: bool = True, device_types: tuple[str, ...] = ("cuda",)):
        self.graphs, self.device_types = graphs, device_types

    def supports(self, model, input_ids: torch.Tensor, kwargs: dict) -> bool:
        """Whether to decode this batch here: a supported device, plain causal attention over prompt + answer, and no
        logits processor of `generate` (from `kwargs` or the model's generation config) beyond temperature and top-p.
        """
        return (input_ids.device.type in self.device_types
                and static_decode_supported(model, input_ids.shape[1] + kwargs["max_new_tokens"])
                and generate_processors(model, kwargs) <= STATIC_PROCESSORS)

    @torch.no_grad()
    def sample(self, model, input_ids, attention_mask, kwargs: dict) -> torch.Tensor:
        """The sampling `model.generate(**kwargs)` does (temperature then top-p, multinomial, padding after a stop
        token, `num_return_sequences` adjacent), decoded over a preallocated KV cache with GQA decode attention and,
        with `graphs`, each decode step replayed as one CUDA graph.

        Args:
            input_ids, attention_mask: (B, P) left-padded prompts on the model's device.
            kwargs: the sampler's generate kwargs (temperature, top_p, max_new_tokens, num_return_sequences, eos/pad).

        Returns:
            (B * n, T) new tokens, T <= max_new_tokens (pad after each sequence's stop token).
        """
        from transformers.generation.logits_process import TopPLogitsWarper

        n, new_tokens, pad_id = kwargs["num_return_sequences"], kwargs["max_new_tokens"], kwargs["pad_token_id"]
        temperature, top_p = kwargs["temperature"], kwargs["top_p"]
        top_p_warper = TopPLogitsWarper(top_p) if top_p is not None and top_p < 1.0 else None
        prompts, prompt = input_ids.shape
        batch, device, length = prompts * n, input_ids.device, prompt + new_tokens
        stop = torch.tensor(kwargs["eos_token_id"], device=device)
        valid = attention_mask.bool()
        positions = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)  # as generate computes them
        cache = _StaticKVCache(batch, length, n)

        with _gqa_decode_attention(model):
            # Prefill each prompt once, PREFILL_TOKENS at a time (bounded activations), into its n samples' cache
            # rows. Causal over the prompt, padding keys masked; a padding query attends to itself, so no softmax row
            # is empty.
            index = torch.arange(prompt, device=device)
            causal = (index[None, :] <= index[:, None]) & valid[:, None, :] | (index[None, :] == index[:, None])
            cache.slots, per_chunk, last = index, max(1, PREFILL_TOKENS // prompt), []
            for first in range(0, prompts, per_chunk):
                chunk = slice(first, first + per_chunk)
                cache.rows = slice(first * n, min(prompts, first + per_chunk) * n)
                last.append(model(input_ids=input_ids[chunk], attention_mask=causal[chunk, None],
                                  position_ids=positions[chunk], past_key_values=cache, use_cache=True,
                                  logits_to_keep=1).logits[:, -1])
            logits = torch.cat(last).repeat_interleave(n, 0)
            del causal, last

            # Decode: fixed input tensors, updated in place before each step.
            cache.rows = None
            tokens = torch.empty(batch, 1, dtype=torch.long, device=device)
            position = positions[:, -1:].repeat_interleave(n, 0)
            cache.slots = torch.full((1,), prompt - 1, dtype=torch.long, device=device)
            mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=device)  # (B * n, 1, 1, L)
            mask[:, 0, 0, :prompt] = valid.repeat_interleave(n, 0)

            def step():
                return model(input_ids=tokens, attention_mask=mask, position_ids=position, past_key_values=cache,
                             use_cache=True).logits[:, -1]

            out = torch.full((batch, new_tokens), pad_id, dtype=torch.long, device=device)
            unfinished = torch.ones(batch, dtype=torch.bool, device=device)
            graph = None
            for t in range(new_tokens):
                scores = logits.float() / temperature
                if top_p_warper is not None:
                    scores = top_p_warper(None, scores)
                chosen = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[:, 0]
                chosen = torch.where(unfinished, chosen, pad_id)
                out[:, t] = chosen
                unfinished &= ~torch.isin(chosen, stop)
                if t == new_tokens - 1 or not unfinished.any():
                    break
                tokens.copy_(chosen[:, None])
                position.add_(1)
                cache.slots.add_(1)
                mask.index_fill_(3, cache.slots, True)
                if self.graphs and graph is None:
                    graph, logits = self._capture_or_none(step)
                if graph is not None:
                    graph.replay()
                else:
                    logits = step()
        return out[:, : t + 1]

    def _capture_or_none(self, step):
        try:
            return _capture_step(step)
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager steps
            if is_out_of_memory(error):
                raise
            self.graphs = False
            LOG.warning(f"selfee generation: CUDA graph capture failed ({type(error).__name__}: {error}); decoding "
                        "without graphs from now on")
            return None, None
