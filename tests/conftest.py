"""Shared fixtures: a tiny local Llama and tokenizer, built once per session; no hub access."""

from __future__ import annotations

import json
import os
import random

# Set by the test setup, not by the person running it: Axolotl's telemetry and hub lookups would otherwise
# retry network calls that cannot succeed here.
os.environ["AXOLOTL_DO_NOT_TRACK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

WORDS = [str(i) for i in range(10)] + "sort these numbers please answer yes no hello world the a is".split()


def _corpus(n=200, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Directory holding a 2-layer, hidden-32 Llama and its locally trained tokenizer (with chat template)."""
    from selfee_plugin.tiny import build_tiny_llama, build_tokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = build_tokenizer(_corpus())
    build_tiny_llama(tokenizer, str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
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
