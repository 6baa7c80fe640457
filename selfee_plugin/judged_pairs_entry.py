"""The settings of one `type: selfee_plugin.judged_pairs` dataset entry: which entry Axolotl is loading, its options
(read back from the config file, since Axolotl's validation drops them) and the pairs files it names.

Axolotl 0.19 validates a preference dataset entry into its own schema and drops every other key, so the options are
read from the config file it loaded (`cfg.axolotl_config_path`). Every message names the entry as the file writes it
(`datasets[i]` or `test_datasets[i]`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The logger `_logging.get_logger` names, without importing Axolotl (and torch) when this module is imported.
LOG = logging.getLogger(f"axolotl.integrations.{__name__}")

TYPE_NAME = "selfee_plugin.judged_pairs"


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


def find_entry(cfg, dataset_idx: int) -> tuple[str, dict]:
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
            f"{key} ({TYPE_NAME}): cfg.axolotl_config_path is not set, so the entry's options "
            f"({', '.join(JudgedPairsOptions.model_fields)}), which Axolotl's validation drops, cannot be read; using "
            "their defaults. Load the config with `axolotl.cli.config.load_cfg` (as every `axolotl` command does) to "
            "use them."
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
