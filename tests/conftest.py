"""Shared fixtures: a tiny local Llama and tokenizer, built once per session; no hub access."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

# Set by the test setup, not by the person running it: Axolotl's telemetry and hub lookups would otherwise
# retry network calls that cannot succeed here.
os.environ["AXOLOTL_DO_NOT_TRACK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The demo package (and its tiny-model builders) lives outside the wheel, in examples/selfee_demo.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import pytest  # noqa: E402

WORDS = [str(i) for i in range(10)] + "sort these numbers please answer yes no hello world the a is".split()


def _corpus(n=200, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Directory holding a 2-layer, hidden-32 Llama and its locally trained tokenizer (with chat template)."""
    from selfee_demo.tiny import build_tiny_llama, build_tokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = build_tokenizer(_corpus())
    build_tiny_llama(tokenizer, str(path))
    return str(path)


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    """A fresh tokenizer per test: tests set `padding_side` and the like, which must not leak into the next."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh float32 copy of the tiny Llama, per test."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32")


def _sort_prompt(rng):
    return "sort " + " ".join(str(rng.randint(0, 9)) for _ in range(4))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """Seed preference pairs (`seed.jsonl`, chat_template.default format) and a prompt pool (`prompts.jsonl`)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("tiny_data")
    with open(path / "seed.jsonl", "w") as f:
        for _ in range(16):
            prompt = _sort_prompt(rng)
            nums = prompt.split()[1:]
            f.write(json.dumps({
                "messages": [{"role": "user", "content": prompt}],
                "chosen": {"role": "assistant", "content": " ".join(sorted(nums))},
                "rejected": {"role": "assistant", "content": " ".join(nums)},
            }) + "\n")
    with open(path / "prompts.jsonl", "w") as f:
        for _ in range(40):
            f.write(json.dumps({"prompt": _sort_prompt(rng)}) + "\n")
    return str(path)


def tiny_train_config(model_dir: str, data_dir: str, output_dir: str, **overrides) -> dict:
    """An Axolotl DPO config for the tiny model on CPU, with the plugin and a `selfee:` block."""
    cfg = {
        "base_model": model_dir,
        "tokenizer_type": "AutoTokenizer",
        "chat_template": "tokenizer_default",
        "rl": "dpo",
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "datasets": [
            {"path": f"{data_dir}/seed.jsonl", "ds_type": "json", "split": "train", "type": "chat_template.default"}
        ],
        "sequence_len": 64,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "bf16": False,
        "fp16": False,
        "output_dir": output_dir,
        "dataset_prepared_path": f"{output_dir}/prepared",
        "logging_steps": 1,
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "dataset_num_proc": 1,
        "seed": 42,
        "plugins": ["selfee_plugin.SelfeePlugin"],
        "selfee": {"rounds": 0, "seed_epochs": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def run_axolotl_train(cfg: dict, workdir, timeout: int = 600, check: bool = True, launcher: str = "python"):
    """Run the real `axolotl train` CLI on `cfg` in a subprocess; returns the CompletedProcess (output merged).

    `--launcher python` (one of Axolotl's launchers) runs training in the CLI's own process instead of starting a
    second one through accelerate: the same code path on one CPU process, about 10 s less per run.
    """
    import subprocess
    import sys

    import yaml

    path = os.path.join(str(workdir), "config.yml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    axolotl = os.path.join(os.path.dirname(sys.executable), "axolotl")
    proc = subprocess.run(
        [axolotl, "train", path, "--launcher", launcher], cwd=str(workdir), capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    proc.output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"axolotl train failed ({proc.returncode}):\n{proc.output[-6000:]}")
    return proc


@pytest.fixture
def selfee_logs(caplog):
    """caplog on our loggers, which live under `axolotl.integrations.` (selfee_plugin/_logging.py). Importing
    `axolotl.cli` applies Axolotl's logging config, which stops `axolotl.*` from propagating to the root logger
    caplog listens on (caplog then misses them in that test), so its handler goes on our namespace itself.
    Captures WARNING and up unless a test lowers the handler's level."""
    import logging

    logger = logging.getLogger("axolotl.integrations.selfee_plugin")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny matmuls on a shared 2-core machine run far slower when torch's threads fight other processes.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
