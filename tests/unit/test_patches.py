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


# ---------------------------------------------------------------------------------------- axolotl_multiprocess_cpu


@pytest.fixture
def two_cpu_processes(monkeypatch):
    """This process as rank 1 of 2 on a machine without an accelerator; the ModelLoader method and the accelerate
    flag are restored afterwards."""
    from axolotl.loaders.model import ModelLoader

    from selfee_plugin.patches import axolotl_multiprocess_cpu as multiprocess_cpu

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv(multiprocess_cpu.CPU_FLAG, raising=False)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # Axolotl's choose_device asks CUDA directly
    monkeypatch.setattr(ModelLoader, "_set_device_map_config", ModelLoader._set_device_map_config)
    yield multiprocess_cpu
    monkeypatch.delenv(multiprocess_cpu.CPU_FLAG, raising=False)  # set by apply(), outside monkeypatch's record


def _device_map_kwargs(tiny_model_dir):
    """What Axolotl's ModelLoader passes to from_pretrained as device_map, from a config normalized by Axolotl."""
    from types import SimpleNamespace

    from axolotl.loaders.model import ModelLoader
    from axolotl.utils.config import normalize_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault({"base_model": tiny_model_dir, "micro_batch_size": 1, "gradient_accumulation_steps": 1,
                       "num_epochs": 1, "bf16": False, "fp16": False})
    normalize_config(cfg)
    loader = SimpleNamespace(cfg=cfg, model_kwargs={}, is_fsdp_enabled=False, is_qlora_and_fsdp_enabled=False)
    ModelLoader._set_device_map_config(loader)
    return cfg, loader.model_kwargs


def test_axolotl_version_is_the_multiprocess_cpu_patch_range():
    from selfee_plugin.patches import axolotl_multiprocess_cpu as multiprocess_cpu

    assert multiprocess_cpu.in_range(), f"axolotl {multiprocess_cpu.installed_version()} is outside the patch's range"


def test_unpatched_axolotl_gives_a_cpu_process_an_accelerator_index(two_cpu_processes, tiny_model_dir):
    """The upstream behaviour the patch exists for; when this fails, upstream changed: revisit or delete the patch."""
    from accelerate import DistributedType, PartialState

    cfg, kwargs = _device_map_kwargs(tiny_model_dir)
    assert cfg.device == "cpu" and cfg.world_size == 2
    assert kwargs["device_map"] == {"": 1}, "Axolotl no longer maps a CPU process to accelerator LOCAL_RANK"
    # accelerate 1.13 makes a multi-process CPU run MULTI_CPU only when asked to (TrainingArguments.use_cpu, or
    # ACCELERATE_USE_CPU): otherwise each process is a run of its own. `_prepare_backend` uses no instance state.
    assert PartialState._prepare_backend(None, cpu=False) == (None, DistributedType.NO)
    assert PartialState._prepare_backend(None, cpu=True) == ("gloo", DistributedType.MULTI_CPU)


def test_patched_axolotl_loads_on_cpu_and_asks_accelerate_for_gloo(two_cpu_processes, tiny_model_dir):
    import os

    from transformers import TrainingArguments

    multiprocess_cpu = two_cpu_processes
    assert multiprocess_cpu.apply() is True
    assert multiprocess_cpu.apply() is False  # idempotent
    _, kwargs = _device_map_kwargs(tiny_model_dir)
    assert kwargs["device_map"] == {"": "cpu"}
    assert os.environ[multiprocess_cpu.CPU_FLAG] == "true"
    # transformers reads the flag where it builds the trainer's accelerate state (training_args.py _setup_devices).
    import inspect

    assert multiprocess_cpu.CPU_FLAG in inspect.getsource(TrainingArguments._setup_devices.func), (
        "TrainingArguments no longer reads ACCELERATE_USE_CPU: the patch would leave each process training alone"
    )


def test_multiprocess_cpu_patch_is_not_applied_where_it_is_not_needed(two_cpu_processes, monkeypatch, tiny_model_dir):
    multiprocess_cpu = two_cpu_processes
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)  # a GPU machine: upstream is right
    assert multiprocess_cpu.apply() is False
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: upstream keeps choose_device's map
    assert multiprocess_cpu.apply() is False
    _, kwargs = _device_map_kwargs(tiny_model_dir)
    assert kwargs["device_map"] == "auto"
