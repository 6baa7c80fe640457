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
      entry's options are read back from the config file it loaded (`judged_pairs_entry`). Its cache of
      prepared datasets (`dataset_prepared_path`) is keyed by path, type and data_files, not by these options nor
      the files' contents: after changing either, delete that folder or point it elsewhere.

Entry options (beside Axolotl's `path`, `data_files`, `split`): see `judged_pairs_entry.JudgedPairsOptions`.

Raises:
    ValueError: a wrong option, a file that is not a judged-pairs file or a damaged row (naming the entry key, the
        file and the line), an `rl:` mode that cannot use pairs, or no pair left to train on.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from collections import Counter
from functools import partial

from .artifacts import read_judged_rows
from .judged_pairs_entry import TYPE_NAME, find_entry, pairs_files, read_options

# The logger `_logging.get_logger` names, without importing Axolotl (and torch) when this module is imported.
LOG = logging.getLogger(f"axolotl.integrations.{__name__}")

PAIR_MODES = ("dpo", "ipo", "simpo", "orpo")
UNPAIRED_MODES = ("kto",)
REQUIRED_KEYS = ("prompt_id", "messages", "responses", "chosen_index", "rejected_index", "probability")


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
    from .formatting import format_completion, format_prompt  # imports Axolotl's logging: only when rows are made

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


# ----------------------------------------------------------------------------------------------- the type


def _rl_name(cfg) -> str | None:
    rl = cfg.get("rl")
    return getattr(rl, "value", rl)


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
    key, entry = find_entry(cfg, dataset_idx)
    key, options = read_options(cfg, key, entry)
    files = pairs_files(key, entry)
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
