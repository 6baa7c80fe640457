"""A hostile new user's configs and data files: each is refused before any weights load, naming the key or the file
and row, the value, and what is allowed. Run as `axolotl train` runs them: `load_cfg`, then the plugin's
`pre_model_load` (prompt pool, seed rows, eval pairs, resume), with model loading made to fail the test."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from helpers import tiny_train_config


def _write(path, text: str | bytes):
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(path, mode) as f:
        f.write(text)
    return str(path)


def _prompts(path):
    return [{"path": path, "ds_type": "json", "type": "prompt"}]


def _seed_row(chosen="1 2 3", rejected="3 2 1"):
    return json.dumps({"messages": [{"role": "user", "content": "sort 3 2 1"}],
                       "chosen": {"role": "assistant", "content": chosen},
                       "rejected": {"role": "assistant", "content": rejected}}) + "\n"


# (id, change(tmp_path, cfg) -> None, patterns the message must match)
CASES = [
    ("smoothing-too-large", lambda t, c: c["selfee"]["refine"].update(smoothing=0.7),
     [r"selfee\.refine\.smoothing", r"less than 0\.5", "0.7"]),
    ("noisy-fraction-1", lambda t, c: c["selfee"]["refine"].update(noisy_fraction=1.0),
     [r"selfee\.refine\.noisy_fraction", "less than 1"]),
    ("negative-extrapolation", lambda t, c: c["selfee"]["refine"].update(extrapolation=-1),
     [r"selfee\.refine\.extrapolation", "greater than or equal to 0"]),
    ("window-0", lambda t, c: c["selfee"]["refine"].update(window=0), [r"selfee\.refine\.window", "greater than"]),
    ("rounds-negative", lambda t, c: c["selfee"].update(rounds=-1), [r"selfee\.rounds is -1", "count >= 0"]),
    ("round-size-zero", lambda t, c: c["selfee"].update(rounds=[0, 5]), [r"selfee\.rounds is \[0, 5\]", "positive"]),
    ("count-without-size", lambda t, c: c["selfee"].update(rounds=2), [r"prompts_per_round is required"]),
    ("list-and-size", lambda t, c: c["selfee"].update(prompts_per_round=3), [r"prompts_per_round is set", "remove one"]),
    ("one-sample", lambda t, c: c["selfee"].update(samples_per_prompt=1),
     [r"selfee\.samples_per_prompt", "greater than or equal to 2"]),
    ("batch-size-0", lambda t, c: c["selfee"]["generation"].update(batch_size=0),
     [r"selfee\.generation\.batch_size is 0", "auto"]),
    ("batch-size-word", lambda t, c: c["selfee"]["generation"].update(batch_size="big"),
     [r"selfee\.generation\.batch_size", "auto"]),
    ("temperature-0", lambda t, c: c["selfee"]["generation"].update(temperature=0),
     [r"selfee\.generation\.temperature", "greater than 0"]),
    ("top-p-1.5", lambda t, c: c["selfee"]["generation"].update(top_p=1.5), [r"selfee\.generation\.top_p", "1"]),
    ("pairing-unknown", lambda t, c: c["selfee"]["judge"].update(pairing="random"),
     [r"selfee\.judge\.pairing", "best_worst", "best_random"]),
    ("typo-key", lambda t, c: c["selfee"].update(genration={"batch_size": 4}),
     [r"selfee\.genration", "Extra inputs are not permitted"]),
    ("prompt-type-unknown", lambda t, c: c["selfee"]["prompts"][0].update(type="alpaca"),
     [r"selfee\.prompts\.0\.type", "messages", "ultrafeedback"]),
    ("rl-kto", lambda t, c: c.update(rl="kto"), [r"rl: dpo", "'kto'"]),
    ("ipo-loss", lambda t, c: c.update(dpo_loss_type=["ipo"]), [r"dpo_loss_type: \['ipo'\]", r"allowed: \[sigmoid\]"]),
    ("wpo-weighting", lambda t, c: c.update(dpo_use_weighting=True), [r"dpo_use_weighting: True", "allowed: false"]),
    ("liger", lambda t, c: c.update(dpo_use_liger_kernel=True), [r"dpo_use_liger_kernel: True", "allowed: false"]),
    ("eval-pairs-no-path", lambda t, c: c["selfee"]["judge"].update(eval_pairs={"type": "chat_template.default"}),
     [r"selfee\.judge\.eval_pairs needs a `path`"]),
    ("eval-pairs-missing-file", lambda t, c: c["selfee"]["judge"].update(
        eval_pairs={"path": str(t / "nope.jsonl"), "ds_type": "json"}),
     [r"selfee\.judge\.eval_pairs\.path .*nope\.jsonl.* does not exist"]),
    ("reference-model-missing", lambda t, c: c["selfee"]["judge"].update(reference_model=str(t / "no_model")),
     [r"selfee\.judge\.reference_model .*no_model", "local model directory nor a hub id"]),
    ("no-seed-no-reference", lambda t, c: c.update(datasets=[]), [r"selfee\.judge\.reference_model is required"]),
    ("rounds-without-prompts", lambda t, c: c["selfee"].pop("prompts"), [r"selfee\.prompts is empty", "rounds: 0"]),
    ("prompt-file-empty", lambda t, c: c["selfee"].update(prompts=_prompts(_write(t / "empty.jsonl", ""))),
     [r"selfee\.prompts\[0\]", "empty.jsonl", "empty file"]),
    ("prompt-file-latin1", lambda t, c: c["selfee"].update(
        prompts=_prompts(_write(t / "latin.jsonl", b'{"prompt": "sort 1 2"}\n{"prompt": "caf\xe9 2 1"}\n'))),
     [r"selfee\.prompts\[0\]", "latin.jsonl", "line 2", "not UTF-8"]),
    ("prompt-file-not-json", lambda t, c: c["selfee"].update(
        prompts=_prompts(_write(t / "bad.jsonl", '{"prompt": "sort 1 2"}\nsort 3 4\n'))),
     [r"selfee\.prompts\[0\]", "bad.jsonl", "line 2", "not a JSON object"]),
    ("prompt-file-missing", lambda t, c: c["selfee"].update(prompts=_prompts(str(t / "gone.jsonl"))),
     [r"selfee\.prompts\[0\]", "gone.jsonl", "could not be loaded"]),
    ("prompt-field-wrong", lambda t, c: c["selfee"]["prompts"][0].update(field_prompt="question"),
     [r"selfee\.prompts\[0\]", "no usable prompt", "field_prompt='question'"]),
    ("pool-too-small", lambda t, c: c["selfee"].update(rounds=[30, 30]),
     [r"asks for 60 prompts", "holds only 40"]),
    ("seed-empty-chosen", lambda t, c: c["datasets"][0].update(path=_write(
        t / "seed_bad.jsonl", _seed_row() + _seed_row(chosen="") + _seed_row(rejected=""))),
     [r"datasets\[0\]", "seed_bad.jsonl", "row 1: `chosen` is empty", "row 2: `rejected` is empty"]),
    ("seed-unknown-type", lambda t, c: c["datasets"][0].update(type="chat_template.nonexistent"),
     [r"datasets\[0\]", "seed.jsonl", "not an Axolotl DPO dataset type"]),
]


@pytest.mark.parametrize("case,change,patterns", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_any_weights_load(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch,
                                                      case, change, patterns):
    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import PluginManager
    from axolotl.loaders import ModelLoader

    selfee = {"rounds": [6, 6], "seed_epochs": 1, "prompts": _prompts(f"{tiny_data_dir}/prompts.jsonl"),
              "generation": {"max_new_tokens": 8}, "judge": {}, "refine": {}}
    cfg = tiny_train_config(tiny_model_dir, tiny_data_dir, str(tmp_path / "out"), selfee=selfee)
    change(tmp_path, cfg)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(ModelLoader, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(PluginManager, "_instance", None)
    with pytest.raises(ValueError) as info:
        parsed = load_cfg(str(path))
        PluginManager.get_instance().pre_model_load(parsed)  # what `axolotl train` runs next, before the weights
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{case}: {pattern!r} not in: {message[:1500]}"


def test_the_battery_is_large_enough():
    assert len(CASES) >= 25
