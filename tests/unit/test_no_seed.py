"""No seed pairs: `datasets:` absent, `selfee.judge.reference_model` as pi_init, round 0 skipped (README "No seed pairs").

The end-to-end tests (tests/e2e/test_no_seed_e2e.py) run the paper's other setting through the real `axolotl train`
CLI: an instruct ("SFT") model judged against the base model it was tuned from.
"""

from __future__ import annotations

import copy

import pytest
import torch

BASE = {
    "base_model": "unused/model", "rl": "dpo", "adapter": "lora", "learning_rate": 1e-5, "micro_batch_size": 1,
    "gradient_accumulation_steps": 1, "num_epochs": 1, "plugins": ["selfee_plugin.SelfeePlugin"],
    "selfee": {"rounds": [4], "prompts": [{"path": "prompts.jsonl", "ds_type": "json", "type": "prompt"}],
               "judge": {"reference_model": "org/base-model"}},
}


@pytest.fixture
def validate(fresh_plugin_manager):
    """Axolotl's own config validation with the plugin's schema mixed in, as `axolotl train` runs it."""
    from axolotl.integrations.base import PluginManager
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    def run(raw):
        PluginManager._instance = None
        cfg = DictDefault(copy.deepcopy(raw))
        prepare_plugins(cfg)
        return validate_config(cfg)

    return run


@pytest.mark.parametrize("datasets", ["absent", None, []], ids=["absent", "null", "empty-list"])
def test_no_seed_config_passes_axolotl_validation(validate, datasets):
    raw = copy.deepcopy(BASE)
    if datasets != "absent":
        raw["datasets"] = datasets
    cfg = validate(raw)
    assert cfg.get("datasets") is None
    assert cfg["selfee"]["judge"]["reference_model"] == "org/base-model"


@pytest.mark.parametrize("change,message", [
    (lambda raw: raw["selfee"].pop("judge"), r"no seed preference pairs .* selfee\.judge\.reference_model is required"),
    (lambda raw: raw["selfee"].update(rounds=0), r"selfee\.rounds is 0: there is nothing to train"),
    (lambda raw: raw.update(val_set_size=0.1), r"val_set_size would be ignored.*selfee\.judge\.eval_pairs"),
    (lambda raw: raw["selfee"]["judge"].update(eval_pairs="auto"), r"eval_pairs: auto holds out a share of the seed"),
    (lambda raw: raw.pop("selfee"), "either datasets or pretraining_dataset is required"),  # Axolotl's own check
])
def test_no_seed_config_refused(validate, change, message):
    raw = copy.deepcopy(BASE)
    change(raw)
    with pytest.raises(ValueError, match=message):
        validate(raw)


def test_the_plugin_validator_replaces_axolotls(fresh_plugin_manager):
    """The plugin's `check_dataset_or_pretraining_dataset` is the one in the merged config class (its mixin precedes
    Axolotl's validation mixins in the MRO); if Axolotl renames or moves its validator, this fails first."""
    from axolotl.integrations.base import PluginManager
    from axolotl.integrations.config import merge_input_args
    from axolotl.utils.schemas.validation import DatasetValidationMixin

    from selfee_plugin.args import SelfeeArgs

    PluginManager.get_instance().register("selfee_plugin.SelfeePlugin")
    _, merged = merge_input_args()
    validator = merged.__pydantic_decorators__.model_validators["check_dataset_or_pretraining_dataset"]
    assert validator.func.__func__ is SelfeeArgs.check_dataset_or_pretraining_dataset.__func__
    assert hasattr(DatasetValidationMixin, "check_dataset_or_pretraining_dataset")


def test_load_datasets_gives_an_empty_seed_set_only_without_seed_pairs():
    from axolotl.utils.dict import DictDefault

    from selfee_plugin.plugin import SelfeePlugin

    # A plugin instance serves one run (it keeps the run's context), so each config gets its own.
    meta = SelfeePlugin().load_datasets(DictDefault({"selfee": BASE["selfee"]}))
    assert len(meta.train_dataset) == 0 and meta.eval_dataset is None
    assert set(meta.train_dataset.column_names) == {"prompt", "chosen", "rejected"}
    assert SelfeePlugin().load_datasets(DictDefault({"selfee": BASE["selfee"]}), preprocess=True) is not None
    assert SelfeePlugin().load_datasets(DictDefault({"selfee": BASE["selfee"], "datasets": [{"path": "x"}]})) is None
    assert SelfeePlugin().load_datasets(DictDefault({})) is None  # not a SELFEE run: Axolotl loads its datasets


def test_reference_model_must_share_the_policy_tokenizer(tiny_model_dir, tiny_tokenizer, tmp_path):
    from axolotl.utils.dict import DictDefault
    from selfee_demo.tiny import build_tiny_llama, build_tokenizer

    from selfee_plugin.data_checks import check_reference_model

    cfg = DictDefault({})
    check_reference_model(cfg, tiny_model_dir, tiny_tokenizer)  # the same tokenizer: fine

    # Config and tokenizer files only: the check reads no weights.
    build_tiny_llama(tiny_tokenizer, None).config.save_pretrained(str(tmp_path / "other"))
    build_tokenizer(["zebra yak xylophone sort 3 2 1 please"], save_dir=str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"selfee\.judge\.reference_model .*other.* has another tokenizer"):
        check_reference_model(cfg, str(tmp_path / "other"), tiny_tokenizer)

    small = build_tiny_llama(tiny_tokenizer, None).config
    small.vocab_size = len(tiny_tokenizer) - 2
    small.save_pretrained(str(tmp_path / "small"))
    with pytest.raises(ValueError, match=r"token embeddings, fewer than the \d+ tokens of the policy's tokenizer"):
        check_reference_model(cfg, str(tmp_path / "small"), tiny_tokenizer)

    with pytest.raises(ValueError, match=r"selfee\.judge\.reference_model .*empty.* cannot be read as a model"):
        (tmp_path / "empty").mkdir()
        check_reference_model(cfg, str(tmp_path / "empty"), tiny_tokenizer)


def test_reference_model_is_loaded_quantized_like_the_policy(tiny_model_dir):
    """Under QLoRA the reference is loaded in 4-bit too (a 7B reference: ~4 GB instead of 14 GB in bf16)."""
    from bitsandbytes.nn import Linear4bit
    from helpers import _lora
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from selfee_plugin.references import init_judge_reference

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                      bnb_4bit_quant_type="nf4")
    policy = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                        quantization_config=quantization), seed=None)
    reference = init_judge_reference(policy, None, tiny_model_dir)
    assert any(isinstance(module, Linear4bit) for module in reference.modules())
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    plain = init_judge_reference(_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                       seed=None), None, tiny_model_dir)
    assert not any(isinstance(module, Linear4bit) for module in plain.modules()) and plain.dtype == torch.float32
