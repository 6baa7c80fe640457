"""The references: pi_init for the judge, pi_{t-1} for DPO (the `ref` adapter or a frozen copy), and how to run them.

Under LoRA/QLoRA no base weight is ever copied: pi_init is the model with adapters disabled (a fresh adapter) or a
frozen copy of the starting adapter (`selfee_init`, when the run starts from `lora_model_dir`); pi_{t-1} is the frozen
adapter named `ref`, which TRL 1.9's DPOTrainer uses as its reference when it exists. Full fine-tuning keeps frozen
copies. `judge.reference_model` replaces pi_init by another model.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from ._logging import get_logger
from .patches import bitsandbytes_cpu_weight_packing

LOG = get_logger(__name__)

REF_ADAPTER = "ref"  # the name TRL 1.9's DPOTrainer looks for (trl/trainer/dpo_trainer.py, _compute_loss)
INIT_ADAPTER = "selfee_init"
POLICY_ADAPTER = "default"


def _is_peft(model) -> bool:
    from accelerate.utils import is_peft_model

    return is_peft_model(model)


@contextmanager
def reference_context(model, reference):
    """Yield the module whose forward gives the reference, without copying any base weight.

    Args:
        model: the policy (a PEFT model unless `reference` is a module).
        reference: None (the PEFT model with adapters disabled), a PEFT adapter name (activated for the duration,
            as TRL 1.9 does with its `ref` adapter), or a separate frozen `nn.Module`.
    """
    from trl.trainer.utils import use_adapter

    if isinstance(reference, torch.nn.Module):
        yield reference
        return
    if not _is_peft(model):
        raise ValueError(
            f"reference={reference!r} needs a PEFT model (adapters to disable or switch); for full fine-tuning "
            "pass the frozen reference model itself."
        )
    # PEFT's set_adapter makes the activated adapter trainable; restore every flag the caller had.
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with use_adapter(model, reference):
            yield model
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)


def dpo_reference(trainer):
    """The reference TRL's DPO loss uses for `trainer` (as `reference_context` takes it): ref_model, else `ref`
    adapter when present, else adapters disabled."""
    if trainer.ref_model is not None:
        return trainer.ref_model
    model = trainer.accelerator.unwrap_model(trainer.model)
    return REF_ADAPTER if REF_ADAPTER in model.peft_config else None


def adapter_parameters(model, adapter: str = POLICY_ADAPTER) -> dict[str, torch.nn.Parameter]:
    """One adapter's parameters by name (PEFT puts the adapter's name in each: `...lora_A.<adapter>.weight`)."""
    return {name: param for name, param in model.named_parameters() if f".{adapter}." in name}


def copy_adapter(model, source: str, target: str) -> None:
    """Copy adapter `source` into a frozen adapter `target` (created if needed); the policy adapter stays active."""
    if target not in model.peft_config:
        model.add_adapter(target, model.peft_config[source])
    for name, param in adapter_parameters(model, source).items():
        target_param = model.get_parameter(name.replace(f".{source}.", f".{target}."))
        target_param.data.copy_(param.data)
        target_param.requires_grad_(False)
    model.set_adapter(POLICY_ADAPTER)


def load_reference_model(path: str, model):
    """`judge.reference_model`, frozen, loaded as the policy's base was: same dtype and, under QLoRA, the same 4-bit
    quantization (a 7B reference then takes ~4 GB instead of 14 GB in bf16, and both judged log-probs come from
    4-bit weights), on the policy's device."""
    from transformers import AutoModelForCausalLM

    quantization = getattr(model.config, "quantization_config", None)
    if quantization is None:
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=model.dtype).to(model.device)
    else:
        # A quantized model cannot be moved with `.to()`: place it on the policy's device while loading.
        ref = AutoModelForCausalLM.from_pretrained(
            path, dtype=model.dtype, quantization_config=quantization, device_map={"": model.device}
        )
        bitsandbytes_cpu_weight_packing.apply(ref, LOG)  # as the policy gets in the plugin's post_model_load
    LOG.info(f"selfee: judge reference pi_init = {path} ({'quantized' if quantization else ref.dtype})")
    return ref.eval().requires_grad_(False)


def init_judge_reference(model, trainer, reference_model: str | None):
    """pi_init for the judge: `judge.reference_model`, a frozen copy of a starting adapter, adapters disabled, or
    (full fine-tuning) a frozen copy of the starting model. Call before the first round trains."""
    if reference_model:
        return load_reference_model(reference_model, model)
    if not _is_peft(model):
        return copy.deepcopy(trainer.accelerator.unwrap_model(model)).eval().requires_grad_(False)
    if REF_ADAPTER in model.peft_config:
        # TRL made `ref` a copy of a pretrained starting adapter (lora_model_dir): that adapter is pi_init, and
        # `ref` will be overwritten by later snapshots, so keep it under its own frozen name.
        copy_adapter(model, REF_ADAPTER, INIT_ADAPTER)
        return INIT_ADAPTER
    return None  # a fresh adapter: disabling it gives pi_init


def snapshot_dpo_reference(model, trainer) -> None:
    """Make the current policy the DPO reference of the next round (pi_{t-1}): the `ref` adapter, or the frozen copy."""
    if _is_peft(model):
        copy_adapter(model, POLICY_ADAPTER, REF_ADAPTER)
    elif trainer.ref_model is not None:
        trainer.ref_model.load_state_dict(trainer.accelerator.unwrap_model(model).state_dict())
