"""Sampling responses from the current policy: the sampler interface, its HF backend, and batch sizing to the machine."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

from ._logging import get_logger
from .formatting import format_prompt, tokenize_prompt
from .logprobs import eval_mode

LOG = get_logger(__name__)

# Sequences per batch with `batch_size: auto` on CPU: enough to amortise per-step overhead, small enough for RAM.
CPU_AUTO_SEQUENCES = 64
# Upper bound for `auto` on an accelerator. A decode step reads every weight once whatever the batch, so throughput
# grows with the batch until the KV cache dominates (H200, 7B QLoRA, static loop with CUDA graphs: 256 sequences of
# 150 + 300 tokens at 5,889 tokens/s, 20.1 GiB peak); larger batches were not measured.
AUTO_MAX_SEQUENCES = 256
# Share of the free accelerator memory `auto` plans to use: allocator fragmentation and transient buffers need the rest.
MEMORY_MARGIN = 0.85


@dataclass
class Generations:
    """Responses sampled for a list of prompts, aligned with the prompts' order.

    Attributes:
        prompts: formatted prompt strings, one per input prompt.
        responses: per prompt, n decoded answers (special tokens skipped, stripped); None when the prompt was skipped.
        finished: per prompt, whether each answer stopped at EOS (False: cut at max_new_tokens); None when skipped.
        skipped: prompt index -> reason (`prompt_too_long`).
        generated_tokens: sampled tokens, EOS included, padding after EOS excluded.
        seconds: wall time of sampling.
        batch_prompts: prompts per generate() call actually used (after any out-of-memory halving).
    """

    prompts: list[str]
    responses: list[list[str] | None]
    finished: list[list[bool] | None]
    skipped: dict[int, str] = field(default_factory=dict)
    generated_tokens: int = 0
    seconds: float = 0.0
    batch_prompts: int = 0


class Sampler(Protocol):
    """What the round loop needs from a generation backend (`selfee.generation.backend`)."""

    def generate(self, prompts: list[list[dict]], n: int, seed: int) -> Generations:
        """Sample `n` answers per prompt (chat turns ending before the answer), reproducibly for a given seed."""


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids that end an answer: the tokenizer's EOS plus any the model's generation config lists (end of turn)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def _sampling_kwargs(gen_cfg, n: int, stop_ids: list[int], pad_token_id: int) -> dict:
    # Every knob a checkpoint's generation_config.json could set is given explicitly: otherwise transformers falls
    # back to top_k=50 or to the hub's repetition_penalty, which is not the paper's sampling (temperature, top_p only).
    return {
        "do_sample": True,
        "temperature": gen_cfg.temperature,
        "top_p": gen_cfg.top_p,
        "top_k": 0,
        "min_p": None,
        "typical_p": 1.0,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "max_new_tokens": gen_cfg.max_new_tokens,
        "min_new_tokens": 0,
        "num_return_sequences": n,
        "eos_token_id": stop_ids,
        "pad_token_id": pad_token_id,
        "use_cache": True,
    }


# ----------------------------------------------------------------------------------------------- batch sizing


def free_accelerator_bytes(device: torch.device) -> int:
    """Bytes this process may still allocate on `device`: the driver's free memory plus PyTorch's cached free blocks,
    capped by `torch.cuda.set_per_process_memory_fraction` when one is set."""
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    available = free + reserved - allocated
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.10
    fraction = get_fraction(device) if get_fraction is not None else 1.0
    return int(min(available, fraction * total - allocated))


def sequence_bytes(config, tokens: int, prompt_tokens: int, dtype_bytes: int = 2) -> int:
    """Accelerator bytes one generated sequence needs: its KV cache, sampling buffers and its share of the prefill.

    Args:
        config: the model's transformers config (layers, KV heads, head dim, vocabulary, MLP width).
        tokens: prompt + new tokens the cache must hold.
        prompt_tokens: tokens of the prompt (prefill activations).
        dtype_bytes: bytes per cached value (2 for bf16/fp16).
    """
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = 2 * text.num_hidden_layers * kv_heads * head_dim * tokens * dtype_bytes
    # float32 logits, their softmax, top-p's sorted copy and int64 indices: about 6 float32 vectors per sequence.
    sampling = 6 * text.vocab_size * 4
    mlp = getattr(text, "intermediate_size", 4 * text.hidden_size)
    # HF generate prefills every sequence at once; the static loop prefills PREFILL_TOKENS at a time, for which this
    # per-sequence share is a generous allowance.
    prefill = prompt_tokens * (3 * mlp + 4 * text.hidden_size) * dtype_bytes
    return kv + sampling + prefill


def auto_batch_sequences(model, prompt_tokens: int, max_new_tokens: int) -> int:
    """Sequences per generate() call for `batch_size: auto`: a fixed modest batch on CPU; on an accelerator the most
    whose cache and buffers fit the free memory with a margin, at most AUTO_MAX_SEQUENCES."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return CPU_AUTO_SEQUENCES
    budget = MEMORY_MARGIN * free_accelerator_bytes(device)
    per_sequence = sequence_bytes(model.config, prompt_tokens + max_new_tokens, prompt_tokens)
    return int(max(1, min(AUTO_MAX_SEQUENCES, budget // per_sequence)))


# ----------------------------------------------------------------------------------------------- fast decoding

# Model types whose decoder layers are plain causal attention over a standard KV cache and accept a prepared 4D mask:
# `static_sample` drives them. Others (hybrid, encoder-decoder, windows shorter than the batch) use HF generate.
STATIC_DECODE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
# Replay each batch's decode step as one CUDA graph; switched off (with a warning) after a capture fails.
CUDA_GRAPHS = True
GQA_DECODE_ATTENTION = "selfee_gqa_sdpa"
# Prompt tokens per prefill forward of the static loop: bounds its activations (~2 GB on a 7B) whatever the batch.
PREFILL_TOKENS = 8192


def static_decode_supported(model, total_tokens: int) -> bool:
    """Whether `static_sample` can run `model` for sequences of up to `total_tokens` (prompt + answer)."""
    config = model.config
    if config.model_type not in STATIC_DECODE_MODEL_TYPES or config._attn_implementation != "sdpa":
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or window >= total_tokens  # the window never cuts in: plain causal attention


def gqa_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' SDPA attention, except for one new token per sequence under grouped-query attention.

    With a padding mask, transformers copies every KV head once per query head before calling SDPA (torch's GQA
    kernels take no mask): on Mistral-7B at 256 sequences x 450 tokens that is ~60 GB of copies per decode step. With
    a single query token, the query heads that share a KV head can stand in for query positions of that head instead:
    the same attention, reading the cache once.
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


@torch.no_grad()
def static_sample(model, input_ids, attention_mask, kwargs: dict, graphs: bool = False) -> torch.Tensor:
    """The sampling `model.generate(**kwargs)` does (temperature then top-p, multinomial, padding after a stop token,
    `num_return_sequences` adjacent), decoded over a preallocated KV cache with GQA decode attention and, with
    `graphs`, each decode step replayed as one CUDA graph.

    HF generate spends most of a 7B decode step in Python (per-module overhead of 224 4-bit + LoRA layers, masks,
    cache growth): ~150 ms per step at 256 sequences on an H200 where the GPU work is a few tens of ms. A graph
    replays the step's kernels with no Python in between (H200: 1,404 -> 5,889 tokens/s).

    Args:
        input_ids, attention_mask: (B, P) left-padded prompts on the model's device.
        kwargs: `_sampling_kwargs` (temperature, top_p, max_new_tokens, num_return_sequences, eos/pad ids).

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
        # Prefill each prompt once, PREFILL_TOKENS at a time (bounded activations), into its n samples' cache rows.
        # Causal over the prompt, padding keys masked; a padding query attends to itself, so no softmax row is empty.
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
            if graphs and graph is None:
                graph, logits = _capture_or_none(step)
                graphs = graph is not None
            if graph is not None:
                graph.replay()
            else:
                logits = step()
    return out[:, : t + 1]


def _capture_or_none(step):
    global CUDA_GRAPHS
    try:
        return _capture_step(step)
    except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager steps
        if _is_out_of_memory(error):
            raise
        CUDA_GRAPHS = False
        LOG.warning(f"selfee generation: CUDA graph capture failed ({type(error).__name__}: {error}); decoding "
                    "without graphs from now on")
        return None, None


# ----------------------------------------------------------------------------------------------- the HF backend


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class HFSampler:
    """transformers `generate` on the policy (or, with `generation.merge_adapter`, on a merged copy of it).

    Prompts are rendered with the chat template's generation prompt and tokenized as DPO training will; those longer
    than `max_prompt_length` tokens are skipped (never truncated). Batches are left padded by hand (the tokenizer's
    padding side is never touched), sorted by length to waste little padding, and sampled with the KV cache under a
    forked RNG seeded per call, so the caller's RNG state is unchanged and the same seed, prompts and batch size give
    the same answers. An out-of-memory error halves the batch and retries the same prompts; the smaller size is kept.
    """

    def __init__(self, model, tokenizer, gen_cfg, progress: bool = False):
        self.model, self.tokenizer, self.cfg, self.progress = model, tokenizer, gen_cfg, progress
        self.batch_prompts = None if gen_cfg.batch_size == "auto" else gen_cfg.batch_size

    def _plan_batch(self, model, longest_prompt: int, n: int) -> int:
        if self.batch_prompts is None:
            sequences = auto_batch_sequences(model, longest_prompt, self.cfg.max_new_tokens)
            self.batch_prompts = max(1, sequences // n)
            LOG.info(f"selfee generation: batch_size auto -> {self.batch_prompts} prompts x {n} samples")
        return self.batch_prompts

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], n: int, seed: int) -> Generations:
        model, tokenizer, cfg = self.model, self.tokenizer, self.cfg
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        texts = [format_prompt(tokenizer, m) for m in prompts]
        out = Generations(prompts=texts, responses=[None] * len(texts), finished=[None] * len(texts))
        kept = []
        for i, text in enumerate(texts):
            ids = tokenize_prompt(tokenizer, text)
            if len(ids) > cfg.max_prompt_length:
                out.skipped[i] = "prompt_too_long"
            else:
                kept.append((i, ids))
        if out.skipped:
            LOG.info(f"skipped {len(out.skipped)} prompt(s) longer than {cfg.max_prompt_length} tokens")
        if not kept:
            return out
        kept.sort(key=lambda item: len(item[1]), reverse=True)

        start = time.perf_counter()
        with self._sampling_model(len(kept[0][1]), n) as sampling_model:
            stop_ids = stop_token_ids(sampling_model, tokenizer)
            kwargs = _sampling_kwargs(cfg, n, stop_ids, pad_id)
            device = next(sampling_model.parameters()).device
            self._plan_batch(sampling_model, len(kept[0][1]), n)
            devices = [device] if device.type == "cuda" else []
            with eval_mode(sampling_model), torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                position = 0
                with tqdm(total=len(kept), desc="selfee generate", disable=not self.progress) as bar:
                    while position < len(kept):
                        # Every batch runs until its longest answer ends, so the prompts left are split evenly
                        # (116 + 12 would take as many decode steps as 64 + 64, with more memory).
                        left = len(kept) - position
                        size = -(-left // -(-left // self.batch_prompts))
                        batch = kept[position : position + size]
                        try:
                            sequences = self._generate_batch(sampling_model, batch, pad_id, device, kwargs)
                        except RuntimeError as error:
                            if not _is_out_of_memory(error) or self.batch_prompts == 1:
                                raise
                            sequences = None  # the traceback (and the batch's tensors) is freed when this block ends
                        if sequences is None:
                            self.batch_prompts //= 2
                            LOG.warning(f"selfee generation: out of memory; retrying with {self.batch_prompts} prompts")
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                            continue
                        self._collect(out, batch, sequences, n, stop_ids)
                        position += len(batch)
                        bar.update(len(batch))
        out.seconds = time.perf_counter() - start
        out.batch_prompts = self.batch_prompts
        return out

    @contextmanager
    def _sampling_model(self, longest_prompt: int, n: int):
        from .merging import merged_copy, should_merge

        model, cfg = self.model, self.cfg
        needed = 0
        if cfg.merge_adapter is not False and next(model.parameters()).device.type == "cuda":
            sequences = self.batch_prompts * n if self.batch_prompts else min(
                AUTO_MAX_SEQUENCES, auto_batch_sequences(model, longest_prompt, cfg.max_new_tokens)
            )
            needed = sequences * sequence_bytes(model.config, longest_prompt + cfg.max_new_tokens, longest_prompt)
        if not should_merge(model, cfg, needed):
            yield model
            return
        merged = merged_copy(model)
        try:
            yield merged
        finally:  # freed before judging: the judge needs that memory for its own batches
            del merged
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @staticmethod
    def _generate_batch(model, batch, pad_id, device, kwargs) -> torch.Tensor:
        from trl.trainer.utils import pad

        input_ids = pad([torch.tensor(ids) for _, ids in batch], pad_id, "left").to(device)
        attention_mask = pad([torch.ones(len(ids), dtype=torch.long) for _, ids in batch], 0, "left").to(device)
        if device.type == "cuda" and static_decode_supported(model, input_ids.shape[1] + kwargs["max_new_tokens"]):
            return static_sample(model, input_ids, attention_mask, kwargs, graphs=CUDA_GRAPHS).cpu()
        sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return sequences[:, input_ids.shape[1] :].cpu()  # (B * n, T), the n sequences of a prompt adjacent

    def _collect(self, out: Generations, batch, new_tokens: torch.Tensor, n: int, stop_ids: list[int]) -> None:
        for row, (index, _) in enumerate(batch):
            answers, finished = [], []
            for ids in new_tokens[row * n : (row + 1) * n].tolist():
                stop = next((k for k, tok in enumerate(ids) if tok in stop_ids), None)
                finished.append(stop is not None)
                ids = ids if stop is None else ids[: stop + 1]
                out.generated_tokens += len(ids)
                answers.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
            out.responses[index], out.finished[index] = answers, finished


SAMPLERS = {"hf": HFSampler}


def make_sampler(model, tokenizer, gen_cfg, progress: bool = False) -> Sampler:
    """The sampler `selfee.generation.backend` names."""
    return SAMPLERS[gen_cfg.backend](model, tokenizer, gen_cfg, progress=progress)


def generate_responses(model, tokenizer, prompts, gen_cfg, n: int, seed: int, progress: bool = False) -> Generations:
    """Sample `n` answers per prompt with the configured backend (see `HFSampler`)."""
    return make_sampler(model, tokenizer, gen_cfg, progress).generate(prompts, n, seed)
