"""Axolotl dataset `type: selfee_plugin.judged_pairs`: a SELFEE run's judged pairs as rows of any preference recipe.

Supports (`rl:` of the recipe; what one kept pair of `output_dir/selfee/round_<t>/pairs.jsonl` becomes):
    - `dpo` with any `dpo_loss_type`, `ipo`, `simpo`, `orpo`: one row `prompt`, `chosen`, `rejected` (strings).
    - `kto`: two rows `prompt`, `completion`, `label` (the chosen answer True, the rejected one False).
    These are the preference modes whose Axolotl 0.19 loaders (`prompt_strategies.dpo`, `.kto`, `.orpo`) resolve a
    `type:` through `prompt_strategies.base.load`, which calls `getattr(import_module("a"), "b")(cfg, dataset_idx)`
    for `type: a.b` (a longer path fails): `selfee_plugin/__init__.py` serves this module as `judged_pairs`, and the
    module is callable (`_DatasetTypeModule`). Reward modelling (`bradley_terry`) imports types only from its own
    package; `grpo`, `gdpo` and `ebft` sample their own completions and are refused here.

Assumptions:
    - Prompts and answers are rendered again from each row's `messages` and `responses` with the recipe's chat
      template (Axolotl sets it on the tokenizer it passes), with the functions SELFEE rendered them with. Under the
      SELFEE run's template the strings equal the file's `prompt` and `completions[i]`; under another template they
      match the recipe's `chat_template.default` rows, so judged pairs and a human seed look alike.
    - Axolotl 0.19 validates a preference dataset entry into its own schema and drops every other key, so the
      entry's options below are read back from the config file it loaded (`cfg.axolotl_config_path`). Its cache of
      prepared datasets (`dataset_prepared_path`) is keyed by path, type and data_files, not by these options nor
      the files' contents: after changing either, delete that folder or point it elsewhere.

Entry options (beside Axolotl's `path`, `data_files`, `split`): see `JudgedPairsOptions`.

Raises:
    ValueError: a wrong option, a file that is not a judged-pairs file or a damaged row (naming the entry key, the
        file and the line), an `rl:` mode that cannot use pairs, no pair left to train on, or `carry_ref_logps`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import types
from collections import Counter
from functools import partial
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The logger `_logging.get_logger` names, without importing Axolotl (and torch) when this module is imported.
LOG = logging.getLogger(f"axolotl.integrations.{__name__}")

TYPE_NAME = "selfee_plugin.judged_pairs"
PAIR_MODES = ("dpo", "ipo", "simpo", "orpo")
UNPAIRED_MODES = ("kto",)
REFERENCE_FREE_MODES = ("simpo", "orpo")
REQUIRED_KEYS = ("prompt_id", "messages", "responses", "chosen_index", "rejected_index", "probability")


class JudgedPairsOptions(BaseModel):
    """Options of a `type: selfee_plugin.judged_pairs` dataset entry."""

    model_config = ConfigDict(extra="forbid")

    min_probability: float | None = Field(
        default=None,
        ge=0.5,
        le=1.0,
        description="Keep only pairs whose judged preference probability sigmoid(beta * margin), with the SELFEE "
        "run's beta, is at least this. Every judged pair has at least 0.5, so 0.5 (or none) keeps all pairs.",
    )
    carry_ref_logps: bool = Field(
        default=False,
        strict=True,
        description="Feed the judge's log pi_{t-1} as TRL's ref_chosen_logps/ref_rejected_logps. Refused on every "
        "recipe Axolotl 0.19 + TRL 1.9 can build; the error names why (see `carry_refusal`).",
    )


# ----------------------------------------------------------------------------------------------- the entry


def _rl_name(cfg) -> str | None:
    rl = cfg.get("rl")
    return getattr(rl, "value", rl)


def _find_entry(cfg, dataset_idx: int) -> tuple[str, dict]:
    """The entry Axolotl is loading. It passes only the index, so look in both lists and refuse a real ambiguity."""
    found = []
    for name in ("datasets", "test_datasets"):
        entries = cfg.get(name) or []
        if dataset_idx < len(entries) and entries[dataset_idx].get("type") == TYPE_NAME:
            found.append((f"{name}[{dataset_idx}]", dict(entries[dataset_idx])))
    if not found:
        raise ValueError(f"{TYPE_NAME} was called for dataset index {dataset_idx}, but neither datasets[{dataset_idx}] "
                         f"nor test_datasets[{dataset_idx}] has `type: {TYPE_NAME}`.")
    if len(found) == 2 and found[0][1] != found[1][1]:
        raise ValueError(
            f"datasets[{dataset_idx}] and test_datasets[{dataset_idx}] are both `type: {TYPE_NAME}` with different "
            "settings, and Axolotl 0.19 tells a dataset type only the index, not which list it loads. Move one of "
            "them to another position (for example, list another dataset before it)."
        )
    return found[0]


def _raw_entry(cfg, key: str, entry: dict) -> tuple[str, dict] | None:
    """(key, entry) as written in the config file, with the keys Axolotl's validation dropped; None without a file.

    Found by its type, path and data_files, preferring the position `key` names: a caller that formats rows outside
    Axolotl's loader may pass a config holding only this entry."""
    import yaml

    path = cfg.get("axolotl_config_path")
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    same = [
        (f"{name}[{i}]", written)
        for name in ("datasets", "test_datasets")
        for i, written in enumerate(raw.get(name) or [])
        if isinstance(written, dict) and written.get("type") == TYPE_NAME
        and str(written.get("path")) == str(entry.get("path")) and written.get("data_files") == entry.get("data_files")
    ]
    if not same:
        raise ValueError(
            f"{key}: {path} has no `type: {TYPE_NAME}` entry with path {entry.get('path')!r}; the file changed after "
            "`axolotl` read it. Rerun the command."
        )
    at_key = [found for found in same if found[0] == key]
    if at_key or all(written == same[0][1] for _, written in same):
        return (at_key or same)[0]
    raise ValueError(
        f"{', '.join(k for k, _ in same)} in {path} read the same pairs with different options, and the entry being "
        f"loaded ({key}) is none of them; give each its own path or data_files."
    )


def read_options(cfg, key: str, entry: dict) -> tuple[str, JudgedPairsOptions]:
    """The entry's options, read from the config file (defaults, with a warning, when there is none to read), and
    the entry's key as the file writes it (`datasets[i]` or `test_datasets[i]`), which every message names.

    Raises:
        ValueError: an unknown key on the entry, or an option out of its bounds, named as `datasets[i].<option>`.
    """
    from axolotl.utils.schemas.datasets import DPODataset, KTODataset, SFTDataset

    found = _raw_entry(cfg, key, entry)
    if found is None:
        LOG.warning(
            f"{key} ({TYPE_NAME}): cfg.axolotl_config_path is not set, so the entry's options (min_probability, "
            "carry_ref_logps), which Axolotl's validation drops, cannot be read; using their defaults. Load the "
            "config with `axolotl.cli.config.load_cfg` (as every `axolotl` command does) to use them."
        )
        return key, JudgedPairsOptions()
    key, written = found
    options = set(JudgedPairsOptions.model_fields)
    axolotl_keys = set(DPODataset.model_fields) | set(KTODataset.model_fields) | set(SFTDataset.model_fields)
    unknown = sorted(k for k in written if k not in options | axolotl_keys)
    if unknown:
        raise ValueError(
            f"{key}.{unknown[0]} is neither an option of {TYPE_NAME} ({', '.join(sorted(options))}) nor an Axolotl "
            f"dataset key (unknown: {unknown}); fix the spelling or remove it."
        )
    try:
        return key, JudgedPairsOptions.model_validate({k: v for k, v in written.items() if k in options})
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ValueError(
            f"{key}.{field}: {first['msg']} (got {first.get('input')!r}). "
            f"{JudgedPairsOptions.model_fields[field].description}"
        ) from None


def pairs_files(key: str, entry: dict) -> list[Path]:
    """The pairs files of the entry, found as Axolotl's loader finds them: `path` itself, or `data_files` patterns
    resolved against the working directory (Hugging Face `datasets` does so) when `path` is a directory."""
    import glob

    path, data_files = Path(entry["path"]), entry.get("data_files")
    if path.is_file():
        if data_files:
            raise ValueError(
                f"{key}.data_files is ignored by Axolotl when {key}.path ({path}) is a file. To read several rounds, "
                "set path to a directory (e.g. the SELFEE run's output_dir) and list the pairs files or a glob such "
                "as <output_dir>/selfee/round_*/pairs.jsonl in data_files; or give each round its own entry."
            )
        return [path]
    if not path.is_dir() or not data_files:
        raise ValueError(
            f"{key}.path ({path}) is not a pairs file. Point it at output_dir/selfee/round_<t>/pairs.jsonl of a "
            "SELFEE run, or at a directory with data_files listing such files (glob patterns allowed)."
        )
    files = sorted({Path(p) for pattern in data_files for p in glob.glob(pattern, recursive=True)})
    if not files:
        raise ValueError(f"{key}.data_files {data_files} match no file from {os.getcwd()}; fix the patterns.")
    return files


# ----------------------------------------------------------------------------------------------- counting


def _row_problem(row: dict) -> str | None:
    w, l, responses = row["chosen_index"], row["rejected_index"], row["responses"]
    if w is None:
        return None
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        return f"responses is {type(responses).__name__}, not a list of strings"
    for name, value in (("chosen_index", w), ("rejected_index", l)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(responses):
            return f"{name} {value!r} is not an index of its {len(responses)} responses"
    if w == l:
        return f"chosen_index and rejected_index are both {w}"
    p = row["probability"]
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        return f"probability {p!r} is not a number in [0, 1]"
    messages = row["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return "messages is not a non-empty list of chat turns"
    return None


def count_judged_pairs(path: str | os.PathLike, min_probability: float | None = None, key: str = "path") -> Counter:
    """What a pairs file holds, in the terms this dataset type trains on (and the rows it would reject).

    Returns:
        Counter with `rows`, `paired`, `kept` (paired and at least `min_probability`), `below_min_probability`,
        and `skipped_<reason>` for each unpaired row's `skip_reason`.

    Raises:
        ValueError: the file lacks a judged-pairs key, or a paired row is damaged (naming the file and line).
    """
    from .artifacts import read_judged_rows

    counts = Counter()
    for line, row in enumerate(read_judged_rows(path), start=1):
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(
                f"{key}: {path} line {line} has no {', '.join(missing)}: it is not a SELFEE judged-pairs file "
                "(output_dir/selfee/round_<t>/pairs.jsonl of a SELFEE run). Point the entry at one."
            )
        problem = _row_problem(row)
        if problem:
            raise ValueError(
                f"{key}: {path} line {line} (prompt_id {row['prompt_id']!r}): {problem}. The file is damaged; "
                "restore it, or delete the round folder and rerun the SELFEE run, which judges the round again."
            )
        counts["rows"] += 1
        if row["chosen_index"] is None or row["rejected_index"] is None:
            counts[f"skipped_{row.get('skip_reason') or 'unpaired'}"] += 1
            continue
        counts["paired"] += 1
        if min_probability is not None and row["probability"] < min_probability:
            counts["below_min_probability"] += 1
        else:
            counts["kept"] += 1
    return counts


# ----------------------------------------------------------------------------------------------- rows


def format_judged_rows(batch: dict, tokenizer=None, *, rl: str, min_probability: float | None, key: str) -> dict:
    """Batched map: kept pairs of a judged-pairs batch -> the recipe's rows (unpaired and improbable pairs vanish).

    Args:
        batch: columns of a pairs file, as Hugging Face `datasets` loads it.
        tokenizer: the recipe's tokenizer, carrying its chat template (Axolotl passes it).
        rl: the recipe's `rl:` mode.

    Returns:
        `prompt`, `chosen`, `rejected` columns; for `kto`, `prompt`, `completion`, `label` (two rows per pair).
    """
    from .formatting import format_completion, format_prompt

    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{key} ({TYPE_NAME}) renders prompts with the recipe's chat template, and the tokenizer has none: set "
            "`chat_template:` as the SELFEE run had it (e.g. tokenizer_default, chatml)."
        )
    if not isinstance(batch.get("prompt_id"), list):
        raise TypeError(
            f"{key} ({TYPE_NAME}) formats batches (its map kwargs say batched=True, and unpaired rows make no row): "
            "apply it as Axolotl does, `dataset.map(transform, **map_kwargs)`, not to one row at a time."
        )
    kto = rl in UNPAIRED_MODES
    out = {"prompt": [], "completion": [], "label": []} if kto else {"prompt": [], "chosen": [], "rejected": []}
    for messages, responses, w, l, p in zip(batch["messages"], batch["responses"], batch["chosen_index"],
                                            batch["rejected_index"], batch["probability"]):
        if w is None or l is None or (min_probability is not None and p < min_probability):
            continue
        prompt = format_prompt(tokenizer, messages)
        chosen, rejected = format_completion(tokenizer, responses[w]), format_completion(tokenizer, responses[l])
        if kto:
            out["prompt"] += [prompt, prompt]
            out["completion"] += [chosen, rejected]
            out["label"] += [True, False]
        else:
            out["prompt"].append(prompt)
            out["chosen"].append(chosen)
            out["rejected"].append(rejected)
    return out


# ----------------------------------------------------------------------------------------------- ref log-probs


def _same_path(path) -> str:
    return os.path.realpath(path) if path and os.path.exists(path) else str(path)


def recipe_reference(cfg) -> tuple[tuple, str]:
    """(identity, description) of the DPO reference Axolotl 0.19 + TRL 1.9 build for this recipe."""
    base, adapter = cfg.get("base_model"), cfg.get("adapter")
    quant = (bool(cfg.get("load_in_4bit")), bool(cfg.get("load_in_8bit")))
    if adapter not in ("lora", "qlora"):
        return ("model", _same_path(base)), f"a frozen copy of base_model {base}"
    if cfg.get("selfee") and cfg.get("lora_model_dir"):
        # The SELFEE plugin loads lora_model_dir trainable; TRL copies it into its frozen `ref` adapter.
        lora_dir = cfg.get("lora_model_dir")
        return (("adapter", _same_path(base), adapter, quant, _same_path(lora_dir)),
                f"{base} with the adapter of lora_model_dir {lora_dir}")
    ignored = f", ignoring lora_model_dir {cfg.get('lora_model_dir')}" if cfg.get("lora_model_dir") else ""
    return (("base", _same_path(base), adapter, quant),
            f"base_model {base} with adapters disabled (for rl: dpo Axolotl 0.19 builds only a LoRA config{ignored}, "
            "and TRL adds a fresh adapter)")


def judge_policy(path: str | os.PathLike) -> tuple[tuple | None, str]:
    """(identity, description) of pi_{t-1}, the policy whose log-probs a round's pairs carry as `policy_logps`;
    identity is None (and the description says why) when the run's `state.json` cannot tell."""
    import json

    from .artifacts import STATE_FILE, policy_dir

    path = Path(path).resolve()
    match, root = re.fullmatch(r"round_(\d+)", path.parent.name), path.parent.parent
    if not match or not (root / STATE_FILE).is_file():
        return None, (f"{path} is not at output_dir/selfee/round_<t>/pairs.jsonl beside the run's state.json, so "
                      "the policy that judged it is unknown")
    state = json.loads((root / STATE_FILE).read_text())
    fp, done, prev = state.get("fingerprint") or {}, set(state.get("completed") or []), int(match.group(1)) - 1
    base, adapter, lora_dir = fp.get("base_model"), fp.get("adapter"), fp.get("lora_model_dir")
    quant, peft = (bool(fp.get("load_in_4bit")), bool(fp.get("load_in_8bit"))), adapter in ("lora", "qlora")
    if prev not in done and prev != 0:
        return None, f"{root / STATE_FILE} does not list round {prev} as finished: the judge of {path} is unknown"
    # With no seed round, pi_0 is pi_init: the starting adapter, or the base model (a fresh adapter is zero).
    policy = policy_dir(root, prev, peft) if prev in done else (lora_dir or None)
    if peft and policy:
        return ("adapter", _same_path(base), adapter, quant, _same_path(policy)), f"{base} + adapter {policy}"
    if peft:
        return ("base", _same_path(base), adapter, quant), f"base_model {base} (no seed round)"
    return ("model", _same_path(policy or base)), f"the model {policy or base}"


def carry_refusal(cfg, rl: str, key: str, files: list[Path]) -> str:
    """Why `carry_ref_logps` cannot be right for this recipe (Axolotl 0.19 + TRL 1.9 leave no case where it is).

    Carried values are right only when the recipe's reference is the judge's pi_{t-1} (same model, same adapter)
    AND the trainer uses them instead of its own. TRL 1.9's DPOTrainer reads `ref_chosen_logps` and
    `ref_rejected_logps` from a dataset only under `precompute_ref_log_probs`, and then computes them itself first
    and stops on the duplicated columns; otherwise it ignores them.
    """
    import trl

    reasons = []
    if rl in REFERENCE_FREE_MODES:
        reasons.append(f"rl: {rl} trains without a reference model, so no reference log-probs are used")
    elif rl in UNPAIRED_MODES:
        reasons.append("rl: kto's reference terms are per-completion log-probs plus a KL estimate over mismatched "
                       "prompts and completions of a batch, which the judge never computed")
    else:
        ref_identity, ref_description = recipe_reference(cfg)
        for path in files:
            identity, description = judge_policy(path)
            if identity is None:
                reasons.append(description)
            elif identity != ref_identity:
                reasons.append(f"{path} was judged by {description}, but this recipe's DPO reference is "
                               f"{ref_description}")
            else:
                reasons.append(f"{path} was judged by {description}, which is this recipe's reference, so the "
                               "values themselves would be right")
        reasons.append(
            f"TRL's DPOTrainer (read from 1.9; installed {trl.__version__}) uses ref_chosen_logps/ref_rejected_logps "
            "from a dataset only with precompute_ref_log_probs: true, and then computes them itself first and stops "
            "on the duplicated columns; without it, it ignores them and runs its own reference forward"
        )
    return (f"{key}.carry_ref_logps: true is refused: " + "; ".join(reasons) + ". Fix: remove carry_ref_logps; "
            "the trainer computes the reference log-probs itself (precompute_ref_log_probs: true computes them once "
            "before training instead of at every step).")


# ----------------------------------------------------------------------------------------------- the type


def judged_pairs(cfg, dataset_idx: int = 0, **kwargs):
    """`type: selfee_plugin.judged_pairs`: Axolotl calls this once per such entry, then maps the entry's rows.

    Args:
        cfg: the validated Axolotl config (with or without the SELFEE plugin).
        dataset_idx: the entry's index in `datasets:` or `test_datasets:`.

    Returns:
        (transform, map_kwargs): the batched `format_judged_rows` and `{"batched": True, "remove_columns":
        "__all__"}`, so only the kept pairs become rows. The counts per file are logged.

    Raises:
        ValueError: see the module docstring.
    """
    # Axolotl's preference loaders always set rl; a caller formatting rows outside a run gets the DPO form.
    rl = _rl_name(cfg) or "dpo"
    if rl not in PAIR_MODES + UNPAIRED_MODES:
        raise ValueError(
            f"{TYPE_NAME} makes preference rows, which rl: {rl} does not train on (it samples its own completions, "
            f"or is not a preference mode). Use it with rl: {', '.join(PAIR_MODES + UNPAIRED_MODES)}."
        )
    key, entry = _find_entry(cfg, dataset_idx)
    key, options = read_options(cfg, key, entry)
    files = pairs_files(key, entry)
    if options.carry_ref_logps:
        raise ValueError(carry_refusal(cfg, rl, key, files))
    total = Counter()
    for path in files:
        counts = count_judged_pairs(path, options.min_probability, key)
        total.update(counts)
        LOG.info(f"{key} ({TYPE_NAME}): {path}: {dict(sorted(counts.items()))}")
    rows_per_pair = 2 if rl in UNPAIRED_MODES else 1
    LOG.info(
        f"{key} ({TYPE_NAME}): {total['kept']} of {total['paired']} judged pairs kept "
        f"(min_probability {options.min_probability}), {total['rows'] - total['paired']} unpaired rows skipped; "
        f"{rows_per_pair * total['kept']} rows for rl: {rl}"
    )
    if total["kept"] == 0:
        raise ValueError(
            f"{key} ({TYPE_NAME}): no pair to train on in {[str(p) for p in files]}: {dict(sorted(total.items()))}. "
            "Lower min_probability, or use rounds that judged pairs."
        )
    transform = partial(format_judged_rows, rl=rl, min_probability=options.min_probability, key=key)
    return transform, {"batched": True, "remove_columns": "__all__"}


class _DatasetTypeModule(types.ModuleType):
    """Axolotl calls the package attribute `selfee_plugin.judged_pairs`, and importing this submodule binds that
    attribute to the module (whatever `__init__.py` put there): so the module itself is the callable."""

    def __call__(self, cfg, dataset_idx: int = 0, **kwargs):
        return judged_pairs(cfg, dataset_idx, **kwargs)


sys.modules[__name__].__class__ = _DatasetTypeModule
