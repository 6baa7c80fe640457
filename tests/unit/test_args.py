"""The `selfee:` block through Axolotl's own config validation: defaults, and one test per rule."""

from __future__ import annotations

import copy

import pytest

from selfee_plugin.args import SelfeeConfig, parse_selfee

BASE = {
    "base_model": "unused/model",
    "rl": "dpo",
    "adapter": "lora",
    "learning_rate": 1e-5,
    "micro_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "num_epochs": 1,
    "datasets": [{"path": "seed.jsonl", "ds_type": "json", "type": "chat_template.default"}],
    "plugins": ["selfee_plugin.SelfeePlugin"],
    "selfee": {"rounds": [4, 4], "prompts": [{"path": "prompts.jsonl", "ds_type": "json", "type": "prompt"}]},
}


pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


def validate(overrides=None, selfee=None, drop=()):
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    raw = copy.deepcopy(BASE)
    raw.update(overrides or {})
    raw["selfee"].update(selfee or {})
    for key in drop:
        raw.pop(key)
    cfg = DictDefault(raw)
    prepare_plugins(cfg)
    return validate_config(cfg)


def test_paper_defaults():
    cfg = validate()
    selfee = parse_selfee(cfg)
    assert selfee.round_sizes == [4, 4]
    assert selfee.samples_per_prompt == 2
    assert (selfee.generation.temperature, selfee.generation.top_p, selfee.generation.max_new_tokens) == (0.7, 1.0, 300)
    assert selfee.judge.pairing == "best_worst"
    refine = selfee.refine
    assert (refine.noisy_fraction, refine.smoothing, refine.extrapolation, refine.window, refine.warmup_ratio) == (
        0.1, 0.1, 0.0, 50, 0.2
    )
    assert (selfee.seed_epochs, selfee.round_epochs) == (3.0, 1.0)
    assert SelfeeConfig.model_fields["rounds"].default == [8000, 20000]


@pytest.mark.parametrize(
    "selfee, key, allowed",
    [
        ({"refine": {"smoothing": 0.7}}, "selfee.refine.smoothing", "less than 0.5"),
        ({"refine": {"smoothing": -0.1}}, "selfee.refine.smoothing", "greater than or equal to 0"),
        ({"refine": {"noisy_fraction": 1.0}}, "selfee.refine.noisy_fraction", "less than 1"),
        ({"refine": {"extrapolation": -1.0}}, "selfee.refine.extrapolation", "greater than or equal to 0"),
        ({"refine": {"window": 0}}, "selfee.refine.window", "greater than or equal to 1"),
        ({"refine": {"warmup_ratio": 1.5}}, "selfee.refine.warmup_ratio", "less than or equal to 1"),
        ({"samples_per_prompt": 1}, "selfee.samples_per_prompt", "greater than or equal to 2"),
        ({"generation": {"temperature": 0}}, "selfee.generation.temperature", "greater than 0"),
        ({"generation": {"top_p": 1.5}}, "selfee.generation.top_p", "less than or equal to 1"),
        ({"judge": {"pairing": "best_of_all"}}, "selfee.judge.pairing", "'best_worst' or 'best_random'"),
        ({"refine": {"smothing": 0.1}}, "selfee.refine.smothing", "Extra inputs are not permitted"),
    ],
)
def test_field_rules_name_the_key(selfee, key, allowed):
    with pytest.raises(ValueError) as info:
        validate(selfee=selfee)
    message = str(info.value)
    assert key in message and allowed in message


def test_round_sizes_must_be_positive():
    with pytest.raises(ValueError, match=r"selfee.rounds is \[4, 0\].*positive"):
        validate(selfee={"rounds": [4, 0]})


def test_round_count_needs_prompts_per_round():
    with pytest.raises(ValueError, match="selfee.prompts_per_round is required"):
        validate(selfee={"rounds": 2})
    assert parse_selfee(validate(selfee={"rounds": 2, "prompts_per_round": 3})).round_sizes == [3, 3]


def test_rounds_need_a_prompt_pool():
    with pytest.raises(ValueError, match="selfee.prompts is empty.*selfee.rounds: 0"):
        validate(selfee={"prompts": None})
    assert parse_selfee(validate(selfee={"prompts": None, "rounds": 0})).round_sizes == []


def test_rl_must_be_dpo():
    with pytest.raises(ValueError, match="selfee requires `rl: dpo`.*'kto'"):
        validate(overrides={"rl": "kto"})


def test_no_seed_needs_judge_reference_model():
    with pytest.raises(ValueError, match="selfee.judge.reference_model is required"):
        validate(drop=("datasets",))
