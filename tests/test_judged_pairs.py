"""`type: selfee_plugin.judged_pairs`: a SELFEE run's judged pairs as the rows of plain Axolotl preference recipes.

Most tests build a finished SELFEE run's artifacts by hand (rows as `annotate` writes them, rendered with SELFEE's
own formatting functions) and run, in process, what `axolotl train` runs: `load_cfg`, Axolotl's preference dataset
loader, its trainer builder, one training step per documented `rl:` mode. The e2e tests run the CLI twice: a SELFEE
run, then IPO without the plugin on that run's round-1 pairs (the issue's acceptance).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_axolotl_train, tiny_train_config

from selfee_plugin.judged_pairs import (
    PAIR_MODES,
    TYPE_NAME,
    UNPAIRED_MODES,
    count_judged_pairs,
    format_judged_rows,
    judged_pairs,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "example_configs" / "ipo-on-judged-pairs.yml"
MIN_PROBABILITY = 0.6
# Round 1: nine pairs (five at or above MIN_PROBABILITY) and three prompts SELFEE could not pair.
ROUND_1 = [0.51, 0.53, 0.55, 0.58, 0.6, 0.62, 0.65, 0.7, 0.8] + ["identical_responses", "empty_response", "reward_tie"]
# Round 2: three pairs (two kept) and a prompt skipped as too long.
ROUND_2 = [0.52, 0.61, 0.75, "prompt_too_long"]
KEPT = {1: 5, 2: 2}
# What each documented `rl:` mode needs beyond the shared recipe (Axolotl 0.19 requires these keys).
MODES = {
    "dpo": {},
    "ipo": {},
    "simpo": {"simpo_gamma": 0.5},
    "orpo": {"orpo_alpha": 0.1},
    "kto": {"remove_unused_columns": False},
}


@pytest.fixture(autouse=True)
def fresh_plugin_manager():
    from axolotl.integrations.base import PluginManager

    PluginManager._instance = None
    yield
    PluginManager._instance = None


# ----------------------------------------------------------------------------------------------- a finished run


def _judged_row(tokenizer, idx: int, outcome) -> dict:
    """One row as `annotate` writes it: `outcome` is the pair's probability, or the reason no pair was made."""
    from selfee_plugin.formatting import format_completion, format_prompt

    nums = [str((idx * 7 + k * 3) % 10) for k in range(4)]
    messages = [{"role": "user", "content": "sort " + " ".join(nums)}]
    responses = [" ".join(sorted(nums)), " ".join(nums) + " 9"]
    row = {"prompt_id": f"0:{idx}", "messages": messages, "prompt": format_prompt(tokenizer, messages),
           "responses": responses, "finished": [True, True]}
    if isinstance(outcome, str):
        keys = ("completions", "policy_logps", "ref_logps", "rewards", "completion_lengths", "chosen_index",
                "rejected_index", "probability", "margin")
        return {**row, "skip_reason": outcome, **dict.fromkeys(keys)}
    w = idx % 2  # chosen is sometimes the first response, sometimes the second
    margin = math.log(outcome / (1 - outcome)) / 0.1  # probability = sigmoid(beta * margin), beta 0.1
    return {**row, "skip_reason": None, "completions": [format_completion(tokenizer, r) for r in responses],
            "policy_logps": [-5.0 - idx, -6.0], "ref_logps": [-5.5, -5.5], "rewards": [0.5, -0.5],
            "completion_lengths": [5, 6], "chosen_index": w, "rejected_index": 1 - w, "probability": outcome,
            "margin": margin}


def _write_run(root: Path, tokenizer, base_model: str, adapter: str | None, completed=(0, 1, 2)) -> Path:
    """output_dir of a finished SELFEE run: state.json, round_1/2 pairs, and the per-round policy folders."""
    selfee = root / "selfee"
    for t, outcomes in ((1, ROUND_1), (2, ROUND_2)):
        (selfee / f"round_{t}").mkdir(parents=True, exist_ok=True)
        with open(selfee / f"round_{t}" / "pairs.jsonl", "w") as f:
            for i, outcome in enumerate(outcomes):
                f.write(json.dumps(_judged_row(tokenizer, 100 * t + i, outcome)) + "\n")
    for t in completed:
        (selfee / f"round_{t}" / ("adapter" if adapter else "model")).mkdir(parents=True, exist_ok=True)
    fingerprint = {"base_model": base_model, "adapter": adapter, "lora_model_dir": None, "load_in_4bit": None,
                   "load_in_8bit": None, "datasets": [{"path": "seed.jsonl", "type": "chat_template.default"}]}
    (selfee / "state.json").write_text(json.dumps({"fingerprint": fingerprint, "completed": list(completed)}))
    return root


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return _write_run(tmp_path_factory.mktemp("selfee_lora_run"), tokenizer, tiny_model_dir, "lora")


def _pairs(run: Path, t: int) -> Path:
    return run / "selfee" / f"round_{t}" / "pairs.jsonl"


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


# ----------------------------------------------------------------------------------------------- recipes


def _recipe(model_dir: str, out: Path, rl: str, datasets: list[dict], **overrides) -> dict:
    """A plain Axolotl preference recipe on the tiny model (no SELFEE plugin), one optimizer step unless overridden."""
    settings = {"max_steps": 1, "micro_batch_size": 2, "lr_scheduler": "constant", **overrides}
    cfg = tiny_train_config(model_dir, "unused", str(out), rl=rl, datasets=datasets, **settings)
    if cfg["max_steps"] is None:
        cfg.pop("max_steps")
    cfg.pop("plugins")
    cfg.pop("selfee")
    return cfg


def _entry(path, **options) -> dict:
    return {"path": str(path), "type": TYPE_NAME, **options}


def _load_cfg(cfg: dict, tmp_path: Path, name: str = "config"):
    """What every `axolotl` command does first: read the YAML file, load plugins, validate, normalize. The type
    reads its options back from that file when the datasets load, so each config keeps its own file."""
    from axolotl.cli.config import load_cfg

    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return load_cfg(str(path))


def _light_cfg(tmp_path: Path, rl: str, entry: dict, **top) -> dict:
    """The config a dataset type receives: Axolotl's validated entry (its own keys only) and the YAML file's path."""
    from axolotl.utils.dict import DictDefault

    path = tmp_path / "light.yml"
    path.write_text(yaml.safe_dump({"rl": rl, "datasets": [entry], **top}))
    kept = {k: v for k, v in entry.items() if k in ("path", "type", "data_files", "split")}
    return DictDefault({"rl": rl, "datasets": [kept], "axolotl_config_path": str(path), **top})


def _train_one_step(cfg):
    """Axolotl's preference dataset loader + trainer builder, then one step; returns the dataset and the trainer."""
    from axolotl.common.datasets import load_preference_datasets
    from axolotl.train import setup_model_and_trainer

    meta = load_preference_datasets(cfg=cfg)
    trainer = setup_model_and_trainer(cfg, meta)[0]
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora_b = [n for n in before if "lora_B" in n]
    assert lora_b, "no LoRA adapter was trained"
    assert all(not torch.equal(before[n], after[n]) for n in lora_b), "a LoRA B matrix did not move"
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n), "a base weight moved"
    assert trainer.state.global_step == 1
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    return meta.train_dataset, trainer


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


def test_axolotls_loader_returns_the_batched_transform(lora_run, tmp_path):
    from axolotl.prompt_strategies.dpo import load as load_dpo
    from axolotl.prompt_strategies.kto import load as load_kto

    for rl, load in (("dpo", load_dpo), ("kto", load_kto)):
        cfg = _light_cfg(tmp_path, rl, _entry(_pairs(lora_run, 1)))
        transform, map_kwargs = load(TYPE_NAME, cfg, dataset_idx=0)
        assert transform.func is format_judged_rows and transform.keywords["rl"] == rl
        assert map_kwargs == {"batched": True, "remove_columns": "__all__"}


# ----------------------------------------------------------------------------------------------- rows


def test_counts_follow_the_rows_and_the_threshold(lora_run):
    path = _pairs(lora_run, 1)
    skipped = {"skipped_identical_responses": 1, "skipped_empty_response": 1, "skipped_reward_tie": 1}
    assert count_judged_pairs(path) == {"rows": 12, "paired": 9, "kept": 9, **skipped}
    assert count_judged_pairs(path, MIN_PROBABILITY) == {
        "rows": 12, "paired": 9, "kept": 5, "below_min_probability": 4, **skipped}
    assert count_judged_pairs(_pairs(lora_run, 2), MIN_PROBABILITY)["kept"] == KEPT[2]


def _batch(path) -> dict:
    from axolotl.utils.data.shared import load_dataset_with_config
    from axolotl.utils.dict import DictDefault

    return load_dataset_with_config(DictDefault(path=str(path)), use_auth_token=False)[:]  # columns, as map sees


def test_rows_are_the_judged_texts_under_the_runs_template(lora_run, tiny_tokenizer):
    """Rendered again with the SELFEE run's template, every kept row is exactly the file's `prompt` and the chosen and
    rejected `completions` (what SELFEE itself trained on); KTO gets each pair as a desirable and an undesirable row."""
    path = _pairs(lora_run, 1)
    kept = [r for r in _rows(path) if r["chosen_index"] is not None and r["probability"] >= MIN_PROBABILITY]
    out = format_judged_rows(_batch(path), tiny_tokenizer, rl="dpo", min_probability=MIN_PROBABILITY, key="k")
    expected = [(r["prompt"], r["completions"][r["chosen_index"]], r["completions"][r["rejected_index"]])
                for r in kept]
    assert list(zip(out["prompt"], out["chosen"], out["rejected"])) == expected and len(expected) == KEPT[1]

    out = format_judged_rows(_batch(path), tiny_tokenizer, rl="kto", min_probability=MIN_PROBABILITY, key="k")
    assert out["label"] == [True, False] * KEPT[1]
    assert out["completion"] == [c for _, chosen, rejected in expected for c in (chosen, rejected)]
    assert out["prompt"] == [p for p, _, _ in expected for _ in range(2)]


def test_rows_follow_the_recipes_chat_template(lora_run, tiny_tokenizer):
    """Under another template (the recipe's), prompts and answers are rendered as that recipe renders its own data."""
    from axolotl.utils.chat_templates import get_chat_template

    tiny_tokenizer.chat_template = get_chat_template("chatml")
    row = next(r for r in _rows(_pairs(lora_run, 1)) if r["chosen_index"] is not None)
    out = format_judged_rows(_batch(_pairs(lora_run, 1)), tiny_tokenizer, rl="dpo", min_probability=None, key="k")
    user = row["messages"][0]["content"]
    assert out["prompt"][0] == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert out["chosen"][0] == row["responses"][row["chosen_index"]] + "<|im_end|>"

    tiny_tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"datasets\[3\] .*set `chat_template:`"):
        format_judged_rows(_batch(_pairs(lora_run, 1)), tiny_tokenizer, rl="dpo", min_probability=None,
                           key="datasets[3]")


# ----------------------------------------------------------------------------------------------- every mode


def test_the_documented_modes_are_the_tested_ones():
    assert set(MODES) == set(PAIR_MODES + UNPAIRED_MODES)


@pytest.mark.parametrize("rl", list(MODES))
def test_each_documented_mode_loads_the_rows_and_trains_one_step(rl, lora_run, tiny_model_dir, tmp_path):
    """Through Axolotl's own loader and trainer builder, as `axolotl train` runs them. `dpo` reads rounds 1-2 through
    a directory `path` and a `data_files` glob; the other modes read round 1."""
    if rl == "dpo":
        entry = _entry(lora_run / "selfee", data_files=[str(lora_run / "selfee" / "round_*" / "pairs.jsonl")],
                       min_probability=MIN_PROBABILITY)
        pairs = KEPT[1] + KEPT[2]
    else:
        entry, pairs = _entry(_pairs(lora_run, 1), min_probability=MIN_PROBABILITY), KEPT[1]
    cfg = _load_cfg(_recipe(tiny_model_dir, tmp_path / "out", rl, [entry], **MODES[rl]), tmp_path)
    dataset, trainer = _train_one_step(cfg)
    if rl in UNPAIRED_MODES:
        assert sorted(dataset.column_names) == ["completion", "label", "prompt"]
        assert len(dataset) == 2 * pairs and sum(dataset["label"]) == pairs
    else:
        assert sorted(dataset.column_names) == ["chosen", "prompt", "rejected"] and len(dataset) == pairs


def test_the_same_rows_with_the_selfee_plugin_enabled(lora_run, tiny_model_dir, tmp_path):
    """A recipe that runs SELFEE (here with judged pairs as its seed) gets the same rows, after the plugin's
    pre-model-load hook (pool, seed checks, resume: what `axolotl train` runs before loading weights)."""
    from axolotl.common.datasets import load_preference_datasets
    from axolotl.integrations.base import PluginManager

    entry = _entry(_pairs(lora_run, 1), min_probability=MIN_PROBABILITY)
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


@pytest.mark.parametrize("case", ["typo", "percent", "below_half", "nothing_kept", "data_files_on_a_file",
                                  "grpo", "not_pairs", "damaged"])
def test_bad_entries_fail_naming_the_key_the_file_and_the_fix(case, lora_run, tiny_data_dir, tmp_path):
    round_1 = _pairs(lora_run, 1)
    entry, rl, match = {
        "typo": (_entry(round_1, min_probabilty=0.6), "dpo",
                 r"datasets\[0\]\.min_probabilty is neither an option of selfee_plugin\.judged_pairs"),
        "percent": (_entry(round_1, min_probability=60), "dpo",
                    r"datasets\[0\]\.min_probability: Input should be less than or equal to 1 \(got 60\)\. Keep only"),
        "below_half": (_entry(round_1, min_probability=0.3), "dpo",
                       r"min_probability: Input should be greater than or equal to 0\.5 .*0\.5 \(or none\) keeps all"),
        "nothing_kept": (_entry(round_1, min_probability=0.99), "dpo",
                         r"datasets\[0\] .*no pair to train on .*'below_min_probability': 9.*Lower min_probability"),
        "data_files_on_a_file": (_entry(round_1, data_files=[str(_pairs(lora_run, 2))]), "dpo",
                                 r"datasets\[0\]\.data_files is ignored by Axolotl when datasets\[0\]\.path .* file"),
        "grpo": (_entry(round_1), "grpo", r"rl: grpo does not train on .*Use it with rl: dpo, ipo, simpo, orpo, kto"),
        "not_pairs": (_entry(f"{tiny_data_dir}/seed.jsonl"), "dpo",
                      r"datasets\[0\]: .*seed\.jsonl line 1 has no prompt_id, .*not a SELFEE judged-pairs file"),
        "damaged": (_entry(_damaged_copy(lora_run, tmp_path)), "dpo",
                    r"damaged\.jsonl line 2 \(prompt_id '0:101'\): chosen_index 5 is not an index of its 2 responses"),
    }[case]
    with pytest.raises(ValueError, match=match):
        judged_pairs(_light_cfg(tmp_path, rl, entry), dataset_idx=0)


def test_without_a_config_file_the_options_keep_their_defaults_and_say_so(lora_run, tmp_path, selfee_logs):
    cfg = _light_cfg(tmp_path, "dpo", _entry(_pairs(lora_run, 1), min_probability=MIN_PROBABILITY))
    cfg.axolotl_config_path = None  # validate_config called directly, not through load_cfg
    transform, _ = judged_pairs(cfg, dataset_idx=0)
    assert transform.keywords["min_probability"] is None
    assert "cfg.axolotl_config_path is not set" in selfee_logs.text and "min_probability" in selfee_logs.text


def test_an_entry_in_test_datasets_is_found_by_its_index(lora_run, tiny_data_dir, tmp_path):
    """Axolotl passes only the index: datasets[0] is a human set, test_datasets[0] the judged pairs."""
    from axolotl.utils.dict import DictDefault

    human = {"path": f"{tiny_data_dir}/seed.jsonl", "type": "chat_template.default"}
    judged = _entry(_pairs(lora_run, 2), min_probability=MIN_PROBABILITY)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"rl": "dpo", "datasets": [human], "test_datasets": [judged]}))
    cfg = DictDefault({"rl": "dpo", "datasets": [human], "test_datasets": [{"path": judged["path"], "type": TYPE_NAME}],
                       "axolotl_config_path": str(path)})
    transform, _ = judged_pairs(cfg, dataset_idx=0)
    assert transform.keywords["key"] == "test_datasets[0]" and transform.keywords["min_probability"] == MIN_PROBABILITY


def test_options_are_found_by_the_entry_for_a_caller_outside_axolotls_loader(lora_run, tiny_data_dir, tmp_path):
    """A check that formats one entry with a config holding only that entry (index 0) still gets the options written
    for it (here at datasets[1]), and messages name it as written."""
    from axolotl.utils.dict import DictDefault

    human = {"path": f"{tiny_data_dir}/seed.jsonl", "type": "chat_template.default"}
    judged = _entry(_pairs(lora_run, 1), min_probability=0.99)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"rl": "dpo", "datasets": [human, judged]}))
    cfg = DictDefault({"datasets": [{"path": judged["path"], "type": TYPE_NAME}], "axolotl_config_path": str(path)})
    with pytest.raises(ValueError, match=r"^datasets\[1\] \(selfee_plugin\.judged_pairs\): no pair to train on"):
        judged_pairs(cfg, dataset_idx=0)


def test_one_row_at_a_time_is_refused(lora_run, tiny_tokenizer):
    row = {k: v[0] for k, v in _batch(_pairs(lora_run, 1)).items()}
    with pytest.raises(TypeError, match=r"formats batches .*dataset\.map\(transform, \*\*map_kwargs\)"):
        format_judged_rows(row, tiny_tokenizer, rl="dpo", min_probability=None, key="datasets[0]")


# ----------------------------------------------------------------------------------------------- ref log-probs


def test_trl_uses_dataset_reference_columns_only_when_it_precomputes_them(tiny_model_dir, tiny_tokenizer, tmp_path):
    """The fact `carry_ref_logps` is refused on (TRL 1.9): without `precompute_ref_log_probs` the DPO trainer ignores
    `ref_chosen_logps`/`ref_rejected_logps` columns (the loss is the same with absurd values in them); with it, it
    computes its own first and stops on the duplicated columns. If TRL changes either, revisit `carry_refusal`."""
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


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return _write_run(tmp_path_factory.mktemp("selfee_full_run"), tokenizer, tiny_model_dir, None)


def test_carry_ref_logps_is_refused_naming_the_reason(lora_run, full_run, tiny_model_dir, tmp_path):
    def refusal(rl, path, **top):
        cfg = _light_cfg(tmp_path, rl, _entry(path, carry_ref_logps=True), **top)
        with pytest.raises(ValueError, match=r"datasets\[0\]\.carry_ref_logps: true is refused") as info:
            judged_pairs(cfg, dataset_idx=0)
        return str(info.value)

    trl_reason = "uses ref_chosen_logps/ref_rejected_logps from a dataset only with precompute_ref_log_probs: true"
    # LoRA recipe on the run's base model: round 1 was judged by pi_0 = base + the seed round's adapter.
    message = refusal("dpo", _pairs(lora_run, 1), base_model=tiny_model_dir, adapter="lora",
                      lora_model_dir=str(lora_run / "selfee" / "round_0" / "adapter"))
    round_0 = lora_run.resolve() / "selfee" / "round_0" / "adapter"
    assert f"was judged by {tiny_model_dir} + adapter {round_0}" in message
    assert "with adapters disabled" in message and "ignoring lora_model_dir" in message and trl_reason in message
    # Full fine-tuning from round 0's model: the reference is pi_0 itself, and TRL still would not use the values.
    message = refusal("dpo", _pairs(full_run, 1), base_model=str(full_run / "selfee" / "round_0" / "model"))
    assert "which is this recipe's reference, so the values themselves would be right" in message
    assert trl_reason in message and "Fix: remove carry_ref_logps" in message
    assert "without a reference model" in refusal("orpo", _pairs(lora_run, 1), base_model=tiny_model_dir)
    outside = tmp_path / "copied.jsonl"
    shutil.copy(_pairs(lora_run, 1), outside)
    assert "beside the run's state.json" in refusal("dpo", outside, base_model=tiny_model_dir, adapter="lora")


# ----------------------------------------------------------------------------------------------- the example


def test_the_example_config_loads_its_rounds_and_trains_a_step(lora_run, tiny_model_dir, tiny_data_dir, tmp_path):
    """example_configs/ipo-on-judged-pairs.yml: known keys only, then run on the tiny model with its hub seed and
    its SELFEE run replaced by local ones (and CPU settings): both rounds and the seed load, and IPO trains."""
    from axolotl.utils.schemas.config import AxolotlInputConfig
    from axolotl.utils.schemas.datasets import DPODataset

    from selfee_plugin.judged_pairs import JudgedPairsOptions

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
    run_dir = lora_run / "selfee"
    local["datasets"] = [
        {"path": f"{tiny_data_dir}/seed.jsonl", "split": "train", "type": "chat_template.default"},
        {**judged, "path": str(run_dir), "data_files": [str(_pairs(lora_run, t)) for t in (1, 2)]},
    ]
    dataset, trainer = _train_one_step(_load_cfg(local, tmp_path))
    kept = sum(count_judged_pairs(_pairs(lora_run, t), judged.get("min_probability"))["kept"] for t in (1, 2))
    assert len(dataset) == 16 + kept  # the tiny seed's 16 pairs + the rounds' kept pairs
    assert trainer.loss_types == ["ipo"]


# ----------------------------------------------------------------------------------------------- the CLI


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


@pytest.mark.e2e
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
    cfg = _recipe(tiny_model_dir, tmp_path / "out", "dpo", [_entry(pairs, min_probability=threshold)],
                  dpo_loss_type=["ipo"], micro_batch_size=1, max_steps=None)
    proc = run_axolotl_train(cfg, tmp_path)
    assert f"{expected} of {len(probabilities)} judged pairs kept (min_probability {threshold})" in proc.output
    prepared = [p for p in (tmp_path / "out" / "prepared").iterdir() if p.is_dir()]
    assert len(prepared) == 1 and len(load_from_disk(str(prepared[0]))) == expected
    # One pair per step (micro batch 1, one epoch): every training row was trained on, and no other.
    assert proc.output.count("'loss': ") == expected
