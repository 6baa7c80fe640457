"""Patches in `patches/` (installed as `selfee_plugin.patches`): each fixes what it says, and fails loudly if upstream moves."""

from __future__ import annotations

import pytest
import torch

from selfee_plugin.patches import bitsandbytes_cpu_weight_packing as packing

from helpers import _lora, _sequences


def _tiny_4bit(tiny_model_dir, hidden=None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, quantization_config=quant)


def _force_avx512bf16(model) -> int:
    """Make every 4-bit layer behave as on a CPU with AVX512-BF16, whatever this machine has."""
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        assert hasattr(layer, packing.ATTRIBUTE), "bitsandbytes moved the CPU packing switch: revisit the patch"
        setattr(layer, packing.ATTRIBUTE, True)
    return len(layers)


def test_version_range_is_the_installed_one():
    assert packing.in_range(), f"bitsandbytes {packing.installed_version()} is outside the patch's tested range"


def test_unpatched_eval_forward_crashes_on_narrow_layers(tiny_model_dir, tiny_tokenizer):
    """The CI failure on AVX512-BF16 machines, reproduced anywhere: the tiny model's 32-wide layers cannot be packed."""
    model = _tiny_4bit(tiny_model_dir).eval()
    assert _force_avx512bf16(model) > 0
    with torch.no_grad(), pytest.raises(RuntimeError, match="invalid for input of size"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_patched_judgment_equals_training_forward_and_keeps_gradients(tiny_model_dir, tiny_tokenizer):
    """With the patch, an eval/no-grad judgment computes what training computes, and training still backpropagates."""
    from selfee_plugin.logprobs import completion_logps

    model = _lora(_tiny_4bit(tiny_model_dir), seed=0)
    _force_avx512bf16(model)
    assert packing.apply(model) > 0
    assert packing.apply(model) == 0  # idempotent
    sequences = _sequences(tiny_tokenizer, 4)
    judged, _ = completion_logps(model, sequences, tiny_tokenizer.pad_token_id)

    model.train()
    for (prompt_ids, completion_ids), logp in zip(sequences, judged):
        ids = torch.tensor([prompt_ids + completion_ids])
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
        target = ids[0, len(prompt_ids):]
        train_logp = logprobs[len(prompt_ids) - 1 : -1].gather(1, target[:, None]).sum()
        torch.testing.assert_close(train_logp.detach(), logp, atol=1e-3, rtol=2e-4)
    train_logp.backward()
    first_layer_a = next(p for n, p in model.named_parameters() if "layers.0." in n and "lora_A" in n)
    assert first_layer_a.grad is not None and first_layer_a.grad.abs().sum() > 0
