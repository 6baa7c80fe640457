"""Plain helper functions shared by the test files (fixtures live in conftest.py): Axolotl configs for the tiny
model and the real `axolotl train` CLI, judged-pair files, the example configs made local, and, for the judge and
annotation tests, prompts, answers, LoRA wrapping and plain log-probs."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from selfee_plugin.formatting import format_completion, format_prompt, tokenize_completion
from selfee_plugin.judged_pairs_entry import TYPE_NAME

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
EXAMPLES_DIR = REPO_ROOT / "example_configs"

BETA = 0.1
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MESSAGES = [
    [{"role": "user", "content": "sort 3 1 2"}],
    [{"role": "user", "content": "hello world the numbers"}],
    [{"role": "system", "content": "answer yes or no"}, {"role": "user", "content": "is 1 2"}],
    [{"role": "user", "content": "sort 9"}],
]
ANSWERS = ["1 2 3", "yes", "no no no the a is", "9", "please answer", "a", "hello world 4 5 6 7 8", "the"]


def _lora(model, seed=0, adapter_name="default"):
    """Wrap `model` in LoRA and, with `seed`, give the B matrices random values so the adapter changes outputs."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS), adapter_name)
    if seed is not None:
        _randomize_lora_b(model, adapter_name, seed)
    return model


def _randomize_lora_b(model, adapter_name, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter_name}." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _sequences(tokenizer, n=8):
    prompts = [format_prompt(tokenizer, MESSAGES[i % len(MESSAGES)]) for i in range(n)]
    return [tokenize_completion(tokenizer, p, format_completion(tokenizer, a)) for p, a in zip(prompts, ANSWERS[:n])]


def _plain_logp(model, prompt_ids, completion_ids):
    """Independent reference: one unpadded forward, log_softmax, gather, sum over completion positions."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
    targets = ids[0, len(prompt_ids) :]
    return logprobs[len(prompt_ids) - 1 : -1].gather(1, targets[:, None]).sum().item()


def _dpo_trainer(model, tokenizer, tmp_path, dataset, new_lora=True):
    from axolotl.core.trainers.dpo.args import AxolotlDPOConfig
    from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
    from peft import LoraConfig

    args = AxolotlDPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=BETA, max_length=128,
        per_device_train_batch_size=2, remove_unused_columns=False, save_strategy="no", disable_tqdm=True,
    )
    return AxolotlDPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS) if new_lora else None,
    )


def _completion_logp(model, tokenizer, prompt: str, completion: str) -> float:
    """log pi(completion | prompt) from the prompt and completion texts, one unpadded forward, log-softmax in
    float32: independent of the judge's batching."""
    prompt_ids, completion_ids = tokenize_completion(tokenizer, prompt, completion)
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    target = ids[0, len(prompt_ids):]
    return logprobs[len(prompt_ids) - 1 : -1].gather(1, target[:, None]).sum().item()


def _rows(path) -> list[dict]:
    """The rows of a JSON Lines file (judged pairs, a demo split)."""
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------- configs and the CLI


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


def tiny_rounds_config(model_dir: str, data_dir: str, out, rounds, batch_size: int, selfee: dict | None = None,
                       **overrides) -> dict:
    """`tiny_train_config` with SELFEE rounds on the tiny prompt pool: one seed epoch, 8 new tokens at temperature 1,
    `batch_size` prompts per generation batch and per judged chunk; `selfee` replaces keys of that block."""
    block = {
        "rounds": rounds, "seed_epochs": 1,
        "prompts": [{"path": f"{data_dir}/prompts.jsonl", "ds_type": "json", "type": "prompt"}],
        "generation": {"max_new_tokens": 8, "batch_size": batch_size, "chunk_size": batch_size, "temperature": 1.0},
        "judge": {"batch_tokens": 256}, **(selfee or {}),
    }
    return tiny_train_config(model_dir, data_dir, str(out), selfee=block, **overrides)


def run_axolotl_train(cfg: dict, workdir, timeout: int = 600, check: bool = True, launcher: str = "python"):
    """Run the real `axolotl train` CLI on `cfg` in a subprocess; returns the CompletedProcess (output merged).

    `--launcher python` (one of Axolotl's launchers) runs training in the CLI's own process instead of starting a
    second one through accelerate: the same code path on one CPU process, about 10 s less per run.
    """
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


# ---------------------------------------------------------------------------------------- example configs, local

# Axolotl DPO types that read UltraFeedback-style rows: chosen/rejected are whole conversations.
ULTRAFEEDBACK_TYPES = {"chat_template.argilla_chat", "chatml.ultra", "llama3.ultra"}


def load_example(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _local_split(split: str | None) -> str:
    """`train_prefs[2000:30000]` -> `train[20:300]`: a local file has one split, and 56 rows instead of 61K."""
    if not split:
        return "train"
    match = re.fullmatch(r"\s*\w+\s*(\[.*\])?\s*", split)
    assert match, f"unexpected split syntax {split!r}"
    bounds = match.group(1) or ""
    return "train" + re.sub(r"\d+", lambda m: str(int(m.group()) // 100), bounds)


def _local_preference_entry(entry: dict, assets: dict) -> dict:
    """A DPO dataset entry pointed at local data of the same shape, keeping its `type` where the data fits it."""
    if entry.get("type") in ULTRAFEEDBACK_TYPES:
        return {**entry, "path": assets["ultrafeedback"], "split": _local_split(entry.get("split"))}
    return {"path": f"{assets['data']}/seed.jsonl", "split": _local_split(entry.get("split")),
            "type": "chat_template.default"}


def _local_prompt_entry(entry: dict, assets: dict) -> dict:
    if entry.get("type") == "ultrafeedback":
        return {"path": assets["ultrafeedback"], "type": "ultrafeedback", "split": _local_split(entry.get("split"))}
    return {"path": f"{assets['data']}/prompts.jsonl", "type": "prompt", "split": _local_split(entry.get("split"))}


def localize(raw: dict, assets: dict, out_dir: Path) -> dict:
    """The example with the tiny local model, adapter and data (conftest's `example_assets`) in place of the hub
    ones; everything else as written."""
    cfg = copy.deepcopy(raw)
    cfg["base_model"] = assets["model"]
    for key in ("base_model_config", "tokenizer_config"):
        if key in cfg:
            cfg[key] = assets["model"]
    if "lora_model_dir" in cfg:
        cfg["lora_model_dir"] = assets["adapter"]
    cfg["output_dir"] = str(out_dir / "out")
    cfg["dataset_prepared_path"] = str(out_dir / "prepared")
    if "datasets" in cfg:  # absent in a no-seed example
        cfg["datasets"] = [_local_preference_entry(e, assets) for e in cfg["datasets"] or []]
    selfee = cfg["selfee"]
    if selfee.get("prompts"):
        selfee["prompts"] = [_local_prompt_entry(e, assets) for e in selfee["prompts"]]
    judge = selfee.get("judge") or {}
    if judge.get("eval_pairs"):
        judge["eval_pairs"] = _local_preference_entry(judge["eval_pairs"], assets)
    if judge.get("reference_model"):
        judge["reference_model"] = assets["model"]
    return cfg


# ----------------------------------------------------------------------------------------------- judged-pairs runs

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


def _judged_row(tokenizer, idx: int, outcome) -> dict:
    """One row as `annotate` writes it: `outcome` is the pair's probability, or the reason no pair was made."""
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


def _pairs(run: Path, t: int) -> Path:
    return run / "selfee" / f"round_{t}" / "pairs.jsonl"


def write_judged_run(root: Path, tokenizer) -> Path:
    """The output_dir of a finished SELFEE run, as far as the judged-pairs type reads it: round_1/2 pairs files."""
    for t, outcomes in ((1, ROUND_1), (2, ROUND_2)):
        (root / "selfee" / f"round_{t}").mkdir(parents=True)
        with open(_pairs(root, t), "w") as f:
            for i, outcome in enumerate(outcomes):
                f.write(json.dumps(_judged_row(tokenizer, 100 * t + i, outcome)) + "\n")
    return root


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
