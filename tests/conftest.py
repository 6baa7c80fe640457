"""Shared fixtures (a tiny local Llama, its tokenizer and data, built once per session; no hub access), and the
`e2e` marker on every test under tests/e2e/. Plain helper functions live in helpers.py: import them from there."""

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

E2E_DIR = Path(__file__).resolve().parent / "e2e"


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by `-m`
def pytest_collection_modifyitems(config, items):
    """Every test under tests/e2e/ is end to end: it carries the `e2e` marker without saying so, and
    `-m "not e2e"` leaves it out. A test marked `e2e` elsewhere belongs in tests/e2e/."""
    for item in items:
        if E2E_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.e2e)
        elif item.get_closest_marker("e2e"):
            item.warn(pytest.PytestWarning("marked e2e outside tests/e2e/: move it there"))


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


@pytest.fixture(scope="session")
def example_assets(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """Local stand-ins for the example configs' hub assets (helpers.localize): an UltraFeedback-shaped file built
    from the tiny data, and a tiny LoRA "SFT adapter"."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("example_assets")
    data = Path(tiny_data_dir)
    seed = [json.loads(line) for line in (data / "seed.jsonl").read_text().splitlines()]
    prompts = [json.loads(line)["prompt"] for line in (data / "prompts.jsonl").read_text().splitlines()]
    pairs = [(r["messages"][0]["content"], r["chosen"]["content"], r["rejected"]["content"]) for r in seed]
    pairs += [(p, " ".join(sorted(p.split()[1:])), " ".join(p.split()[1:])) for p in prompts]
    # HuggingFaceH4/ultrafeedback_binarized's columns: prompt, prompt_id, chosen/rejected conversations, messages.
    with open(root / "ultrafeedback.jsonl", "w") as f:
        for i, (prompt, chosen, rejected) in enumerate(pairs):
            user = {"role": "user", "content": prompt}
            conv_chosen = [user, {"role": "assistant", "content": chosen}]
            conv_rejected = [user, {"role": "assistant", "content": rejected}]
            f.write(json.dumps({"prompt": prompt, "prompt_id": str(i), "chosen": conv_chosen,
                                "rejected": conv_rejected, "messages": conv_chosen,
                                "score_chosen": 8.0, "score_rejected": 4.0}) + "\n")

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapter = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter.save_pretrained(str(root / "sft-lora"))
    return {"model": tiny_model_dir, "data": tiny_data_dir, "ultrafeedback": str(root / "ultrafeedback.jsonl"),
            "adapter": str(root / "sft-lora")}


@pytest.fixture(scope="module")
def selfee_run(tiny_model_dir, tmp_path_factory):
    """output_dir of a finished SELFEE run, as far as the judged-pairs type reads it (`helpers.write_judged_run`)."""
    from helpers import write_judged_run
    from transformers import AutoTokenizer

    return write_judged_run(tmp_path_factory.mktemp("selfee_run"), AutoTokenizer.from_pretrained(tiny_model_dir))


@pytest.fixture
def fresh_plugin_manager():
    """No Axolotl PluginManager singleton before or after the test: plugins one test registers (through
    `prepare_plugins` or `load_cfg`) are not left for the next. A module that wants it around every test says
    `pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")`."""
    from axolotl.integrations.base import PluginManager

    PluginManager._instance = None
    yield
    PluginManager._instance = None


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
