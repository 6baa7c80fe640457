"""`type: selfee_plugin.judged_pairs` end to end: through the CLI twice (a SELFEE run, then IPO without the plugin on
that run's round-1 pairs), and one trainer per documented `rl:` mode and for the example config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import (KEPT, MIN_PROBABILITY, MODES, REPO_ROOT, _entry, _load_cfg, _pairs, _recipe, _rows,
                     _train_one_step, run_axolotl_train, tiny_train_config)

from selfee_plugin.judged_pairs import UNPAIRED_MODES, count_judged_pairs
from selfee_plugin.judged_pairs_entry import TYPE_NAME, JudgedPairsOptions

EXAMPLE = REPO_ROOT / "example_configs" / "ipo-on-judged-pairs.yml"

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


@pytest.fixture(scope="module")
def selfee_cli_run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """A real SELFEE run through `axolotl train` (seed round on the tiny human seed, one round of 8 prompts): the
    judged pairs file of the acceptance test below comes from the plugin's own writer."""
    work = tmp_path_factory.mktemp("selfee_cli")
    selfee = {"rounds": [8], "seed_epochs": 1,
              "prompts": [{"path": f"{tiny_data_dir}/prompts.jsonl", "ds_type": "json", "type": "prompt"}],
              "generation": {"max_new_tokens": 8, "batch_size": 4, "temperature": 1.0}}
    run_axolotl_train(tiny_train_config(tiny_model_dir, tiny_data_dir, str(work / "out"), selfee=selfee), work)
    return work / "out"


def test_ipo_without_the_plugin_trains_on_the_rows_of_a_rounds_pairs_above_the_threshold(
    selfee_cli_run, tiny_model_dir, tmp_path
):
    """The issue's acceptance: `rl: dpo`, `dpo_loss_type: [ipo]`, the pairs.jsonl that the SELFEE run above wrote for
    its round 1, no plugin: training rows = the file's paired rows at or above the threshold (its median here)."""
    from datasets import load_from_disk

    pairs = selfee_cli_run / "selfee" / "round_1" / "pairs.jsonl"
    probabilities = sorted(r["probability"] for r in _rows(pairs) if r["chosen_index"] is not None)
    assert len(probabilities) >= 4, f"the SELFEE round judged too few pairs to test a threshold: {probabilities}"
    threshold = max(0.5, probabilities[len(probabilities) // 2])
    expected = sum(p >= threshold for p in probabilities)
    entry = {"path": str(pairs), "type": TYPE_NAME, "min_probability": threshold}
    cfg = tiny_train_config(tiny_model_dir, "unused", str(tmp_path / "out"), datasets=[entry], dpo_loss_type=["ipo"],
                            micro_batch_size=1, lr_scheduler="constant")
    del cfg["plugins"], cfg["selfee"]  # a plain Axolotl recipe
    proc = run_axolotl_train(cfg, tmp_path)
    assert f"{expected} of {len(probabilities)} judged pairs kept (min_probability {threshold})" in proc.output
    prepared = [p for p in (tmp_path / "out" / "prepared").iterdir() if p.is_dir()]
    assert len(prepared) == 1 and len(load_from_disk(str(prepared[0]))) == expected
    # One pair per step (micro batch 1, one epoch): every training row was trained on, and no other.
    assert proc.output.count("'loss': ") == expected


@pytest.mark.parametrize("rl", list(MODES))
def test_each_documented_mode_loads_the_rows_and_trains_one_step(rl, selfee_run, tiny_model_dir, tmp_path):
    """Through Axolotl's own loader and trainer builder, as `axolotl train` runs them. `dpo` reads rounds 1-2 through
    a directory `path` and a `data_files` glob; the other modes read round 1."""
    if rl == "dpo":
        entry = _entry(selfee_run / "selfee", data_files=[str(selfee_run / "selfee" / "round_*" / "pairs.jsonl")],
                       min_probability=MIN_PROBABILITY)
        pairs = KEPT[1] + KEPT[2]
    else:
        entry, pairs = _entry(_pairs(selfee_run, 1), min_probability=MIN_PROBABILITY), KEPT[1]
    cfg = _load_cfg(_recipe(tiny_model_dir, tmp_path / "out", rl, [entry], **MODES[rl]), tmp_path)
    dataset, trainer = _train_one_step(cfg)
    if rl in UNPAIRED_MODES:
        assert sorted(dataset.column_names) == ["completion", "label", "prompt"]
        assert len(dataset) == 2 * pairs and sum(dataset["label"]) == pairs
    else:
        assert sorted(dataset.column_names) == ["chosen", "prompt", "rejected"] and len(dataset) == pairs


def test_the_example_config_loads_its_rounds_and_trains_a_step(selfee_run, tiny_model_dir, tiny_data_dir, tmp_path):
    """example_configs/ipo-on-judged-pairs.yml: known keys only, then run on the tiny model with its hub seed and
    its SELFEE run replaced by local ones (and CPU settings): both rounds and the seed load, and IPO trains."""
    from axolotl.utils.schemas.config import AxolotlInputConfig
    from axolotl.utils.schemas.datasets import DPODataset

    raw = yaml.safe_load(EXAMPLE.read_text())
    known = set(AxolotlInputConfig.model_fields) | {f.alias for f in AxolotlInputConfig.model_fields.values()}
    assert [k for k in raw if k not in known] == []
    allowed = set(DPODataset.model_fields) | set(JudgedPairsOptions.model_fields)
    assert [k for entry in raw["datasets"] for k in entry if k not in allowed] == []
    assert raw["rl"] == "dpo" and raw["dpo_loss_type"] == ["ipo"] and "plugins" not in raw
    human, judged = raw["datasets"]
    assert judged["type"] == TYPE_NAME and [Path(f).parent.name for f in judged["data_files"]] == ["round_1", "round_2"]

    local = dict(raw, base_model=tiny_model_dir, adapter="lora", load_in_4bit=False, bf16=False, tf32=False,
                 optimizer="adamw_torch", gradient_checkpointing=False, sequence_len=64, micro_batch_size=2,
                 gradient_accumulation_steps=1, max_steps=1, warmup_ratio=0.0, save_strategy="no", dataset_num_proc=1,
                 output_dir=str(tmp_path / "out"), dataset_prepared_path=str(tmp_path / "prepared"))
    for key in ("attn_implementation", "gradient_checkpointing_kwargs", "tokenizer_type"):
        local.pop(key, None)
    run_dir = selfee_run / "selfee"
    local["datasets"] = [
        {"path": f"{tiny_data_dir}/seed.jsonl", "split": "train", "type": "chat_template.default"},
        {**judged, "path": str(run_dir), "data_files": [str(_pairs(selfee_run, t)) for t in (1, 2)]},
    ]
    dataset, trainer = _train_one_step(_load_cfg(local, tmp_path))
    kept = sum(count_judged_pairs(_pairs(selfee_run, t), judged.get("min_probability"))["kept"] for t in (1, 2))
    assert len(dataset) == 16 + kept  # the tiny seed's 16 pairs + the rounds' kept pairs
    assert trainer.loss_types == ["ipo"]
