"""`type: selfee_plugin.judged_pairs`: a SELFEE run's judged pairs as the rows of plain Axolotl preference recipes.

The tests build a finished SELFEE run's pairs files by hand (`helpers.write_judged_run`: rows as `annotate` writes
them, rendered with SELFEE's own formatting functions) and run, in process, what `axolotl train` runs before training:
`load_cfg` and Axolotl's preference dataset loader. tests/e2e/test_judged_pairs_e2e.py trains one step per documented
`rl:` mode and runs the CLI on a real run's pairs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import KEPT, MIN_PROBABILITY, MODES, _entry, _load_cfg, _pairs, _recipe, _rows, tiny_train_config

from selfee_plugin.judged_pairs import PAIR_MODES, UNPAIRED_MODES, count_judged_pairs, format_judged_rows, judged_pairs
from selfee_plugin.judged_pairs_entry import TYPE_NAME

EXAMPLE = Path(__file__).resolve().parents[2] / "example_configs" / "ipo-on-judged-pairs.yml"

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


def _light_cfg(tmp_path: Path, rl: str, entry: dict, **top) -> dict:
    """The config a dataset type receives: Axolotl's validated entry (its own keys only) and the YAML file's path."""
    from axolotl.utils.dict import DictDefault

    path = tmp_path / "light.yml"
    path.write_text(yaml.safe_dump({"rl": rl, "datasets": [entry], **top}))
    kept = {k: v for k, v in entry.items() if k in ("path", "type", "data_files", "split")}
    return DictDefault({"rl": rl, "datasets": [kept], "axolotl_config_path": str(path), **top})



# ----------------------------------------------------------------------------------------------- the type name


def test_axolotl_finds_the_type_on_a_fresh_import():
    """Axolotl 0.19 resolves `type: a.b` as `getattr(import_module("a"), "b")` and calls it; without the plugin
    nothing else imports our module first, so the package itself must provide a callable `judged_pairs`."""
    code = ("import sys, selfee_plugin\n"
            "f = getattr(selfee_plugin, 'judged_pairs')\n"
            "assert callable(f), type(f)\n"
            "assert 'torch' not in sys.modules, 'importing the type must stay light'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_axolotls_loader_returns_the_batched_transform(selfee_run, tmp_path):
    from axolotl.prompt_strategies.dpo import load as load_dpo
    from axolotl.prompt_strategies.kto import load as load_kto

    for rl, load in (("dpo", load_dpo), ("kto", load_kto)):
        cfg = _light_cfg(tmp_path, rl, _entry(_pairs(selfee_run, 1)))
        transform, map_kwargs = load(TYPE_NAME, cfg, dataset_idx=0)
        assert transform.func is format_judged_rows and transform.keywords["rl"] == rl
        assert map_kwargs == {"batched": True, "remove_columns": "__all__"}


# ----------------------------------------------------------------------------------------------- rows


def test_counts_follow_the_rows_and_the_threshold(selfee_run):
    path = _pairs(selfee_run, 1)
    skipped = {"skipped_identical_responses": 1, "skipped_empty_response": 1, "skipped_reward_tie": 1}
    assert count_judged_pairs(path) == {"rows": 12, "paired": 9, "kept": 9, **skipped}
    assert count_judged_pairs(path, MIN_PROBABILITY) == {
        "rows": 12, "paired": 9, "kept": 5, "below_min_probability": 4, **skipped}
    assert count_judged_pairs(_pairs(selfee_run, 2), MIN_PROBABILITY)["kept"] == KEPT[2]


def _batch(path) -> dict:
    from axolotl.utils.data.shared import load_dataset_with_config
    from axolotl.utils.dict import DictDefault

    return load_dataset_with_config(DictDefault(path=str(path)), use_auth_token=False)[:]  # columns, as map sees


def test_rows_are_the_judged_texts_under_the_runs_template(selfee_run, tiny_tokenizer):
    """Rendered again with the SELFEE run's template, every kept row is exactly the file's `prompt` and the chosen and
    rejected `completions` (what SELFEE itself trained on); KTO gets each pair as a desirable and an undesirable row."""
    path = _pairs(selfee_run, 1)
    kept = [r for r in _rows(path) if r["chosen_index"] is not None and r["probability"] >= MIN_PROBABILITY]
    out = format_judged_rows(_batch(path), tiny_tokenizer, rl="dpo", min_probability=MIN_PROBABILITY, key="k")
    expected = [(r["prompt"], r["completions"][r["chosen_index"]], r["completions"][r["rejected_index"]])
                for r in kept]
    assert list(zip(out["prompt"], out["chosen"], out["rejected"])) == expected and len(expected) == KEPT[1]

    out = format_judged_rows(_batch(path), tiny_tokenizer, rl="kto", min_probability=MIN_PROBABILITY, key="k")
    assert out["label"] == [True, False] * KEPT[1]
    assert out["completion"] == [c for _, chosen, rejected in expected for c in (chosen, rejected)]
    assert out["prompt"] == [p for p, _, _ in expected for _ in range(2)]


def test_rows_follow_the_recipes_chat_template(selfee_run, tiny_tokenizer):
    """Under another template (the recipe's), prompts and answers are rendered as that recipe renders its own data."""
    from axolotl.utils.chat_templates import get_chat_template

    tiny_tokenizer.chat_template = get_chat_template("chatml")
    row = next(r for r in _rows(_pairs(selfee_run, 1)) if r["chosen_index"] is not None)
    out = format_judged_rows(_batch(_pairs(selfee_run, 1)), tiny_tokenizer, rl="dpo", min_probability=None, key="k")
    user = row["messages"][0]["content"]
    assert out["prompt"][0] == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert out["chosen"][0] == row["responses"][row["chosen_index"]] + "<|im_end|>"

    tiny_tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"datasets\[3\] .*set `chat_template:`"):
        format_judged_rows(_batch(_pairs(selfee_run, 1)), tiny_tokenizer, rl="dpo", min_probability=None,
                           key="datasets[3]")


# ----------------------------------------------------------------------------------------------- every mode


def test_the_documented_modes_are_the_tested_ones():
    assert set(MODES) == set(PAIR_MODES + UNPAIRED_MODES)


def test_the_same_rows_with_the_selfee_plugin_enabled(selfee_run, tiny_model_dir, tmp_path):
    """A recipe that runs SELFEE (here with judged pairs as its seed) gets the same rows, after the plugin's
    pre-model-load hook (pool, seed checks, resume: what `axolotl train` runs before loading weights)."""
    from axolotl.common.datasets import load_preference_datasets
    from axolotl.integrations.base import PluginManager

    entry = _entry(_pairs(selfee_run, 1), min_probability=MIN_PROBABILITY)
    plain = _load_cfg(_recipe(tiny_model_dir, tmp_path / "plain", "dpo", [entry]), tmp_path, "plain")
    with_plugin = _load_cfg(tiny_train_config(tiny_model_dir, "unused", str(tmp_path / "selfee"), datasets=[entry]),
                            tmp_path, "selfee")
    assert with_plugin.plugins == ["selfee_plugin.SelfeePlugin"] and with_plugin.selfee
    PluginManager.get_instance().pre_model_load(with_plugin)
    rows = []
    for cfg in (plain, with_plugin):
        dataset = load_preference_datasets(cfg=cfg).train_dataset
        rows.append(sorted(zip(dataset["prompt"], dataset["chosen"], dataset["rejected"])))
    assert rows[0] == rows[1] and len(rows[0]) == KEPT[1]


# ----------------------------------------------------------------------------------------------- bad input


def _damaged_copy(run: Path, tmp_path: Path) -> Path:
    rows = _rows(_pairs(run, 1))
    rows[1]["chosen_index"] = 5
    path = tmp_path / "damaged.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case", ["typo", "carry_ref_logps", "percent", "below_half", "nothing_kept",
                                  "data_files_on_a_file", "grpo", "not_pairs", "damaged"])
def test_bad_entries_fail_naming_the_key_the_file_and_the_fix(case, selfee_run, tiny_data_dir, tmp_path):
    round_1 = _pairs(selfee_run, 1)
    entry, rl, match = {
        "typo": (_entry(round_1, min_probabilty=0.6), "dpo",
                 r"datasets\[0\]\.min_probabilty is neither an option of selfee_plugin\.judged_pairs"),
        # An option of earlier versions: refused as unknown, the message listing the options there are.
        "carry_ref_logps": (_entry(round_1, carry_ref_logps=True), "dpo",
                            r"datasets\[0\]\.carry_ref_logps is neither an option of selfee_plugin\.judged_pairs "
                            r"\(min_probability\) nor an Axolotl dataset key"),
        "percent": (_entry(round_1, min_probability=60), "dpo",
                    r"datasets\[0\]\.min_probability: Input should be less than or equal to 1 \(got 60\)\. Keep only"),
        "below_half": (_entry(round_1, min_probability=0.3), "dpo",
                       r"min_probability: Input should be greater than or equal to 0\.5 .*0\.5 \(or none\) keeps all"),
        "nothing_kept": (_entry(round_1, min_probability=0.99), "dpo",
                         r"datasets\[0\] .*no pair to train on .*'below_min_probability': 9.*Lower min_probability"),
        "data_files_on_a_file": (_entry(round_1, data_files=[str(_pairs(selfee_run, 2))]), "dpo",
                                 r"datasets\[0\]\.data_files is ignored by Axolotl when datasets\[0\]\.path .* file"),
        "grpo": (_entry(round_1), "grpo", r"rl: grpo does not train on .*Use it with rl: dpo, ipo, simpo, orpo, kto"),
        "not_pairs": (_entry(f"{tiny_data_dir}/seed.jsonl"), "dpo",
                      r"datasets\[0\]: .*seed\.jsonl line 1 has no prompt_id, .*not a SELFEE judged-pairs file"),
        "damaged": (_entry(_damaged_copy(selfee_run, tmp_path)), "dpo",
                    r"damaged\.jsonl line 2 \(prompt_id '0:101'\): chosen_index 5 is not an index of its 2 responses"),
    }[case]
    with pytest.raises(ValueError, match=match):
        judged_pairs(_light_cfg(tmp_path, rl, entry), dataset_idx=0)


def test_without_a_config_file_the_options_keep_their_defaults_and_say_so(selfee_run, tmp_path, selfee_logs):
    cfg = _light_cfg(tmp_path, "dpo", _entry(_pairs(selfee_run, 1), min_probability=MIN_PROBABILITY))
    cfg.axolotl_config_path = None  # validate_config called directly, not through load_cfg
    transform, _ = judged_pairs(cfg, dataset_idx=0)
    assert transform.keywords["min_probability"] is None
    assert "cfg.axolotl_config_path is not set" in selfee_logs.text and "min_probability" in selfee_logs.text


def test_an_entry_in_test_datasets_is_found_by_its_index(selfee_run, tiny_data_dir, tmp_path):
    """Axolotl passes only the index: datasets[0] is a human set, test_datasets[0] the judged pairs."""
    from axolotl.utils.dict import DictDefault

    human = {"path": f"{tiny_data_dir}/seed.jsonl", "type": "chat_template.default"}
    judged = _entry(_pairs(selfee_run, 2), min_probability=MIN_PROBABILITY)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"rl": "dpo", "datasets": [human], "test_datasets": [judged]}))
    cfg = DictDefault({"rl": "dpo", "datasets": [human], "test_datasets": [{"path": judged["path"], "type": TYPE_NAME}],
                       "axolotl_config_path": str(path)})
    transform, _ = judged_pairs(cfg, dataset_idx=0)
    assert transform.keywords["key"] == "test_datasets[0]" and transform.keywords["min_probability"] == MIN_PROBABILITY


def test_options_are_found_by_the_entry_for_a_caller_outside_axolotls_loader(selfee_run, tiny_data_dir, tmp_path):
    """A check that formats one entry with a config holding only that entry (index 0) still gets the options written
    for it (here at datasets[1]), and messages name it as written."""
    from axolotl.utils.dict import DictDefault

    human = {"path": f"{tiny_data_dir}/seed.jsonl", "type": "chat_template.default"}
    judged = _entry(_pairs(selfee_run, 1), min_probability=0.99)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"rl": "dpo", "datasets": [human, judged]}))
    cfg = DictDefault({"datasets": [{"path": judged["path"], "type": TYPE_NAME}], "axolotl_config_path": str(path)})
    with pytest.raises(ValueError, match=r"^datasets\[1\] \(selfee_plugin\.judged_pairs\): no pair to train on"):
        judged_pairs(cfg, dataset_idx=0)


def test_one_row_at_a_time_is_refused(selfee_run, tiny_tokenizer):
    row = {k: v[0] for k, v in _batch(_pairs(selfee_run, 1)).items()}
    with pytest.raises(TypeError, match=r"formats batches .*dataset\.map\(transform, \*\*map_kwargs\)"):
        format_judged_rows(row, tiny_tokenizer, rl="dpo", min_probability=None, key="datasets[0]")


# ----------------------------------------------------------------------------------------------- ref log-probs


def test_trl_uses_dataset_reference_columns_only_when_it_precomputes_them(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Why the type has no option to carry the judge's log-probs as the reference (TRL 1.9): without
    `precompute_ref_log_probs` the DPO trainer ignores `ref_chosen_logps`/`ref_rejected_logps` columns (the loss is
    the same with absurd values in them); with it, it computes its own first and stops on the duplicated columns. If
    TRL changes either, a plain recipe could use them: revisit the type's options."""
    from axolotl.core.trainers.dpo.args import AxolotlDPOConfig
    from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    rows = {"prompt": ["<|user|> sort 3 1 2 <|end|> <|assistant|> "] * 2, "chosen": ["1 2 3 <|end|>"] * 2,
            "rejected": ["3 1 2 <|end|>"] * 2, "ref_chosen_logps": [100.0, 100.0], "ref_rejected_logps": [-100.0] * 2}

    def trainer(precompute: bool):
        args = AxolotlDPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=0.1,
                                max_length=64, per_device_train_batch_size=2, remove_unused_columns=False,
                                precompute_ref_log_probs=precompute, save_strategy="no", disable_tqdm=True)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        lora = LoraConfig(r=4, target_modules=["q_proj"])
        return AxolotlDPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                                 processing_class=tiny_tokenizer, peft_config=lora)

    ignoring = trainer(precompute=False)
    batch = ignoring.data_collator([ignoring.train_dataset[i] for i in range(2)])
    assert "ref_chosen_logps" in batch  # kept through TRL's tokenization and collator...
    with torch.no_grad():
        with_columns = ignoring.compute_loss(ignoring.model, batch)
        without = ignoring.compute_loss(ignoring.model, {k: v for k, v in batch.items() if "ref_" not in k})
    torch.testing.assert_close(with_columns, without)  # ...and ignored: the loss is log 2 at the start either way
    torch.testing.assert_close(with_columns, torch.tensor(math.log(2)))
    with pytest.raises(ValueError, match="duplicated"):
        trainer(precompute=True)
