"""A temporary copy of the policy with its LoRA merged (QLoRA: dequantized), for fast sampling; never trained."""

from __future__ import annotations

import math

import torch

from ._logging import get_logger
from .memory import MEMORY_MARGIN, free_accelerator_bytes

LOG = get_logger(__name__)


def _compute_dtype(model) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def _dense_weight(layer) -> torch.Tensor:
    """The layer's weight as a dense tensor: bitsandbytes 4-bit weights are dequantized."""
    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    return weight.data


def merged_bytes(model) -> int:
    """Bytes the merged copy takes: every weight dense, in the compute dtype."""
    size = torch.finfo(_compute_dtype(model)).bits // 8
    numel = 0
    for p in model.get_base_model().parameters():
        state = getattr(p, "quant_state", None)
        numel += math.prod(state.shape) if state is not None else p.numel()
    return numel * size  # LoRA matrices are counted too; they are a small overestimate


def mergeable(model) -> str | None:
    """Why `model` cannot be merged for sampling (None when it can)."""
    from accelerate.utils import is_peft_model

    if not is_peft_model(model):
        return "not a PEFT model"
    if any(getattr(c, "use_dora", False) for c in model.peft_config.values()):
        return "DoRA adapters"
    other = [str(c.peft_type) for c in model.peft_config.values() if c.peft_type != "LORA"]
    if other:
        return f"peft_type {other[0]}"
    return None


@torch.no_grad()
def merged_copy(model) -> torch.nn.Module:
    """A plain transformers model equal to `model` with its active LoRA adapter merged, in the compute dtype.

    The PEFT model is only read: its base weights (pi_init for the judge), its adapters and its quantized storage
    stay as they are. Every parameter and buffer of the copy is assigned from the source; a name left unassigned
    is an error, never a randomly initialised weight.
    """
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    dtype = _compute_dtype(model)
    base = model.get_base_model()
    device = model.get_input_embeddings().weight.device
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(base.config, dtype=dtype)

    tensors: dict[str, torch.Tensor] = {}
    lora_prefixes = []
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            lora_prefixes.append(name + ".")
            layer = module.get_base_layer()
            weight = _dense_weight(layer).float()
            if not module.disable_adapters and not module.merged:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {}):
                        weight = weight + module.get_delta_weight(adapter).float()
            tensors[f"{name}.weight"] = weight.to(dtype)
            if getattr(layer, "bias", None) is not None:
                tensors[f"{name}.bias"] = layer.bias.data.to(dtype)
    wrapped = set(lora_prefixes)
    for name, module in base.named_modules():
        if name + "." in wrapped or any(name.startswith(prefix) for prefix in lora_prefixes):
            continue  # a LoRA layer or inside one: its merged weight is already in `tensors`
        for pname, p in module.named_parameters(recurse=False):
            dense = _dense_weight(module) if pname == "weight" else p.data
            tensors[f"{name}.{pname}" if name else pname] = dense.to(dtype)
        for bname, b in module.named_buffers(recurse=False):
            tensors[f"{name}.{bname}" if name else bname] = b

    expected = {n for n, _ in copy.named_parameters()} | {n for n, _ in copy.named_buffers()}
    missing = expected - tensors.keys()
    if missing:
        raise RuntimeError(f"merged sampling copy: no source for {sorted(missing)[:5]}; use generation.merge_adapter: false")
    for full_name in expected:
        owner_name, _, attr = full_name.rpartition(".")
        owner = copy.get_submodule(owner_name) if owner_name else copy
        value = tensors[full_name].to(device)
        if attr in owner._parameters:
            owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[attr] = value
    copy.tie_weights()
    copy.generation_config = model.generation_config
    return copy.eval()


def should_merge(model, gen_cfg, needed_bytes: int) -> bool:
    """Whether to sample from a merged copy: `merge_adapter` true, or auto on an accelerator when the copy and
    `needed_bytes` of generation buffers fit the free memory."""
    setting = gen_cfg.merge_adapter
    if setting is False:
        return False
    reason = mergeable(model)
    if reason is not None:
        if setting is True:
            LOG.warning(f"selfee generation.merge_adapter: true ignored: {reason}")
        return False
    if setting is True:
        return True
    device = model.get_input_embeddings().weight.device
    if device.type != "cuda":
        return False
    return merged_bytes(model) + needed_bytes <= MEMORY_MARGIN * free_accelerator_bytes(device)
