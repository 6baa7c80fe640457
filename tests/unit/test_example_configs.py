"""Every `example_configs/*.yml` through Axolotl's own config validation, with its models and data made local.

Each file is loaded as written, its hub model swapped for the tiny local Llama (and its `lora_model_dir` for a
tiny local adapter), its hub datasets for local files shaped like them, and then run through what `axolotl train`
does before loading a model: `prepare_plugins`, `validate_config` (with a bf16-capable GPU's capabilities, as the
CLI passes them) and `normalize_config`. Axolotl ignores unknown top-level keys, so a separate check makes a
typo in any key of an example an error. No model is trained here; tests/e2e/test_example_configs_e2e.py trains one
example through the CLI.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import EXAMPLES_DIR, load_example, localize

from selfee_plugin.args import SelfeeConfig, parse_selfee

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")

# Examples that reuse a SELFEE run's outputs in a plain recipe (no `selfee:` block) are validated by their own
# test file: ipo-on-judged-pairs.yml by the judged-pairs tests.
EXAMPLES = sorted(p for p in EXAMPLES_DIR.glob("*.yml") if "selfee" in yaml.safe_load(p.read_text()))
EXPECTED = {"zephyr-7b-qlora.yml", "llama3-8b-lora.yml", "phi2-lora.yml", "qwen2.5-0.5b-full.yml",
            "from-sft-adapter.yml", "no-seed-qwen2.5-1.5b-lora.yml"}
# What `axolotl train` passes to validate_config on a bf16-capable GPU (cli/config.py gpu_capabilities).
GPU_CAPABILITIES = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_89"}
# Keys Axolotl's dataset loader reads beyond its DPODataset schema (eval_pairs entries go to the loader as is).
LOADER_KEYS = {"name", "ds_type", "data_files", "revision", "split", "path", "type"}


def _ids(paths):
    return [p.name for p in paths]


@pytest.fixture
def keep_torch_precision():
    # normalize_config applies `tf32: true` process-wide (torch.set_float32_matmul_precision and backends flags);
    # other tests in this session compare float32 values, so put them back.
    backends = [torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn]
    saved = torch.get_float32_matmul_precision(), [getattr(b, "fp32_precision", None) for b in backends]
    yield
    torch.set_float32_matmul_precision(saved[0])
    for backend, value in zip(backends, saved[1]):
        if value is not None:
            backend.fp32_precision = value


def _sliced_rows(entry) -> int:
    """Rows a local entry's split such as `train[20:40]` should select from its JSON Lines file."""
    bounds = re.search(r"\[(\d*):(\d*)\]", entry["split"])
    start, stop = (int(b) if b else None for b in bounds.groups()) if bounds else (None, None)
    return len(range(len(Path(entry["path"]).read_text().splitlines()))[start:stop])


def validate(cfg: dict):
    """What `axolotl train` does to a config before it loads a model (cli/config.py load_cfg)."""
    from axolotl.utils.config import normalize_config, prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(copy.deepcopy(cfg))
    prepare_plugins(cfg)
    cfg = validate_config(
        cfg, capabilities=GPU_CAPABILITIES,
        env_capabilities={"torch_version": torch.__version__.split("+", maxsplit=1)[0]},
    )
    normalize_config(cfg)  # loads the model's config.json only, never its weights
    return cfg


def unknown_keys(raw: dict) -> list[str]:
    """Keys of the example that Axolotl's schema (with the plugin's args mixed in) does not define, or deprecates."""
    from axolotl.integrations.config import merge_input_args
    from axolotl.utils.config import prepare_plugins
    from axolotl.utils.dict import DictDefault
    from axolotl.utils.schemas.datasets import DPODataset

    prepare_plugins(DictDefault(copy.deepcopy(raw)))
    _, input_config = merge_input_args()
    fields = input_config.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    bad = [key for key in raw if key not in known]
    bad += [f"{key} (deprecated)" for key in raw if key in fields and fields[key].deprecated]
    for i, entry in enumerate(raw.get("datasets") or []):
        bad += [f"datasets[{i}].{key}" for key in entry if key not in DPODataset.model_fields]
    eval_pairs = ((raw.get("selfee") or {}).get("judge") or {}).get("eval_pairs") or {}
    bad += [f"selfee.judge.eval_pairs.{key}" for key in eval_pairs
            if key not in DPODataset.model_fields and key not in LOADER_KEYS]
    return bad


def assert_stated(parsed, stated, where="selfee"):
    """Every value the file states in its `selfee:` block is the value the plugin parsed."""
    if isinstance(stated, dict):
        assert isinstance(parsed, dict), f"{where}: {parsed!r}"
        for key, value in stated.items():
            assert key in parsed, f"{where}.{key} was not parsed"
            assert_stated(parsed[key], value, f"{where}.{key}")
    elif isinstance(stated, list) and stated and isinstance(stated[0], dict):
        assert len(parsed) == len(stated), where
        for i, (p, s) in enumerate(zip(parsed, stated)):
            assert_stated(p, s, f"{where}[{i}]")
    else:
        assert parsed == stated, f"{where}: the file says {stated!r}, the plugin parsed {parsed!r}"


def test_the_documented_examples_exist():
    assert EXPECTED <= set(_ids(EXAMPLES)), f"missing: {EXPECTED - set(_ids(EXAMPLES))}"
    readme = (EXAMPLES_DIR / "README.md").read_text()
    assert not [p.name for p in EXAMPLES if p.name not in readme], "example_configs/README.md must list every example"


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_has_only_known_keys(path):
    raw = load_example(path)
    assert raw.get("rl") == "dpo"
    assert "selfee_plugin.SelfeePlugin" in raw.get("plugins", [])
    assert isinstance(raw.get("selfee"), dict), "an example needs a selfee: block"
    assert unknown_keys(raw) == []
    assert_stated(SelfeeConfig.model_validate(raw["selfee"]).model_dump(), raw["selfee"])  # extra="forbid" inside


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_passes_axolotl_validation(path, example_assets, tmp_path, keep_torch_precision):
    raw = load_example(path)
    local = localize(raw, example_assets, tmp_path)
    cfg = validate(local)

    # Nothing the file sets is dropped or changed by Axolotl's validation.
    for key, value in local.items():
        if key != "selfee":
            assert cfg[key] == value, f"{key}: the file says {value!r}, Axolotl kept {cfg[key]!r}"
    selfee = parse_selfee(cfg)
    assert selfee.model_dump() == SelfeeConfig.model_validate(local["selfee"]).model_dump()
    assert_stated(selfee.model_dump(), {k: v for k, v in raw["selfee"].items() if k not in ("prompts", "judge")})
    assert selfee.round_sizes == SelfeeConfig.model_validate(raw["selfee"]).round_sizes
    if "lora_model_dir" in raw:
        assert cfg.adapter in ("lora", "qlora") and (Path(cfg.lora_model_dir) / "adapter_config.json").exists()


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_data_entries_fit_their_types(path, example_assets, tmp_path, keep_torch_precision):
    """The seed entries' Axolotl DPO types, the prompt pool and the eval pairs all read local data of the same shape,
    and the split slices (`train_prefs[:2000]`) go through Axolotl's dataset loader."""
    from axolotl.prompt_strategies.dpo import load as load_dpo
    from axolotl.utils.chat_templates import get_chat_template_from_config
    from axolotl.utils.data.shared import load_dataset_with_config
    from axolotl.utils.dict import DictDefault
    from transformers import AutoTokenizer

    from selfee_plugin.formatting import format_prompt
    from selfee_plugin.judge import load_eval_pairs
    from selfee_plugin.prompt_pool import load_prompt_pool

    cfg = validate(localize(load_example(path), example_assets, tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(example_assets["model"])
    tokenizer.chat_template = get_chat_template_from_config(cfg, tokenizer=tokenizer)  # as Axolotl's loader does
    user = [{"role": "user", "content": "sort 3 1 2"}]
    assert format_prompt(tokenizer, user) != tokenizer.apply_chat_template(user, tokenize=False), \
        "the chat template must render a generation prompt"

    for i, entry in enumerate(cfg.datasets or []):
        rows = load_dataset_with_config(DictDefault(dict(entry)), use_auth_token=False)
        assert len(rows) == _sliced_rows(entry), f"datasets[{i}]: {entry['split']} not applied"
        transform = load_dpo(entry["type"], cfg, dataset_idx=i)
        transform = transform[0] if isinstance(transform, tuple) else transform
        kwargs = {"tokenizer": tokenizer} if "tokenizer" in transform.__code__.co_varnames else {}
        for row in rows.select(range(3)):
            out = transform(dict(row), **kwargs)
            assert all(isinstance(out[k], str) and out[k] for k in ("prompt", "chosen", "rejected")), out

    selfee = parse_selfee(cfg)
    if selfee.prompts:
        pool = load_prompt_pool(selfee)
        assert len(pool) == sum(_sliced_rows(e.model_dump()) for e in selfee.prompts) > 0
    if selfee.judge.eval_pairs:
        pairs = load_eval_pairs(selfee.judge.eval_pairs, tokenizer)
        assert len(pairs) == _sliced_rows(selfee.judge.eval_pairs) > 0


def test_unknown_keys_are_caught():
    """The key check above is what stops a typo: Axolotl's own validation would silently drop these."""
    raw = load_example(EXAMPLES_DIR / "zephyr-7b-qlora.yml")
    raw["lerning_rate"] = 1e-5
    raw["flash_attention"] = True
    raw["datasets"][0]["fiel_chosen"] = "chosen"
    raw["selfee"]["judge"]["eval_pairs"]["splt"] = "test_prefs"
    assert sorted(unknown_keys(raw)) == sorted([
        "lerning_rate", "flash_attention (deprecated)", "datasets[0].fiel_chosen", "selfee.judge.eval_pairs.splt",
    ])
    raw["selfee"]["generation"]["max_new_token"] = 10
    with pytest.raises(ValueError, match="max_new_token"):
        SelfeeConfig.model_validate(raw["selfee"])


def test_zephyr_example_is_the_papers_setup():
    """The paper's setup (SPA section 4.1): seed of ~2K UltraFeedback pairs, rounds of 8K and 20K prompts, beta 0.1, max_length 2048,
    max_prompt_length 1024, cosine schedule, warmup 0.1, effective batch 32, 3 seed epochs and 1 round epoch."""
    raw = load_example(EXAMPLES_DIR / "zephyr-7b-qlora.yml")
    selfee = SelfeeConfig.model_validate(raw["selfee"])
    assert raw["base_model"] == "alignment-handbook/zephyr-7b-sft-full"
    assert raw["datasets"][0]["split"] == "train_prefs[:2000]"
    assert selfee.prompts[0].split == "train_prefs[2000:]"  # disjoint from the seed rows
    assert selfee.round_sizes == [8000, 20000] and selfee.samples_per_prompt == 2
    assert (selfee.seed_epochs, selfee.round_epochs) == (3, 1)
    assert raw["rl_beta"] == 0.1 and raw["sequence_len"] == 2048 and selfee.generation.max_prompt_length == 1024
    assert raw["lr_scheduler"] == "cosine" and raw["warmup_ratio"] == 0.1
    assert raw["micro_batch_size"] * raw["gradient_accumulation_steps"] == 32
    assert (selfee.generation.temperature, selfee.generation.top_p, selfee.generation.max_new_tokens) == (0.7, 1.0, 300)
    assert raw["adapter"] == "qlora" and raw["load_in_4bit"] and raw["gradient_checkpointing"] and raw["bf16"]
