"""Sizing generation batches and merged copies to the accelerator memory this process may still use."""

from __future__ import annotations

import torch

from .config_blocks import AUTO_MAX_SEQUENCES, CPU_AUTO_SEQUENCES

# Share of the free accelerator memory `auto` plans to use: allocator fragmentation and transient buffers need the rest.
MEMORY_MARGIN = 0.85


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
    # HF generate prefills every sequence at once; the static decoder prefills a bounded number of tokens at a time
    # (`static_decoding.PREFILL_TOKENS`), for which this per-sequence share is a generous allowance.
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


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an accelerator running out of memory (some backends raise a plain RuntimeError)."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
