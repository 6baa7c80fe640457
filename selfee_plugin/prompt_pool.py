"""The unlabelled prompt pool: `selfee.prompts` entries loaded through Axolotl, one chat prompt per row, fixed order."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field

from ._logging import get_logger

LOG = get_logger(__name__)

Messages = list[dict[str, str]]


def _as_messages(value) -> Messages | None:
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else None
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in value]
        if any(not isinstance(m["role"], str) or not isinstance(m["content"], str) for m in messages):
            return None
        return messages
    return None


def _drop_last_assistant(messages: Messages | None) -> Messages | None:
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or not any(m["role"] == "user" and m["content"].strip() for m in messages):
        return None
    return messages


def extract_messages(row: dict, entry) -> Messages | None:
    """A chat list: the trailing assistant turn, if any, is the answer and is dropped."""
    return _drop_last_assistant(_as_messages(row.get(entry.field_messages)))


def extract_prompt(row: dict, entry) -> Messages | None:
    """A plain prompt string, sent as one user turn."""
    value = row.get(entry.field_prompt)
    return _as_messages(value) if isinstance(value, str) else None


def extract_ultrafeedback(row: dict, entry) -> Messages | None:
    """UltraFeedback-style rows: the `prompt` string, else `chosen` (a chat list) minus its last turn."""
    prompt = extract_prompt(row, entry)
    if prompt:
        return prompt
    return _drop_last_assistant(_as_messages(row.get(entry.field_chosen)))


EXTRACTORS = {"messages": extract_messages, "prompt": extract_prompt, "ultrafeedback": extract_ultrafeedback}


@dataclass
class PromptPool:
    """The unlabelled prompts, in the fixed order rounds consume them, with what was skipped on load."""

    ids: list[str]
    messages: list[Messages]
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.ids)

    def chunks(self, round_sizes: list[int]) -> list[list[tuple[str, Messages]]]:
        """Consecutive, disjoint slices: round t gets the next `round_sizes[t-1]` prompts, never reused."""
        out, start = [], 0
        for size in round_sizes:
            out.append(list(zip(self.ids[start : start + size], self.messages[start : start + size])))
            start += size
        return out


def _first_non_utf8_line(path: str) -> tuple[int, int] | None:
    """(1-based line, 1-based column) of the first byte sequence that is not UTF-8 in a local file."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return number, error.start + 1
    return None


def _first_non_json_line(path: str) -> tuple[int, str] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line), dict):
                    return number, "not an object"
            except json.JSONDecodeError as error:
                return number, error.msg
    return None


def describe_load_error(key: str, path: str, error: BaseException) -> str:
    """A loader failure as a message naming the config key, the file and, where it can be found, the line."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return f"{key} ({path}) is an empty file: it holds no rows. Fill it or remove the entry."
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        if isinstance(cause, UnicodeDecodeError):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, UnicodeDecodeError) or isinstance(cause, UnicodeDecodeError):
        where = _first_non_utf8_line(path)
        place = f" line {where[0]}, column {where[1]}," if where else ""
        return f"{key} ({path}):{place} is not UTF-8 text. Re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
    bad_json = _first_non_json_line(path) if path.endswith(".jsonl") else None
    if bad_json is not None:
        return f"{key} ({path}): line {bad_json[0]} is not a JSON object ({bad_json[1]}). Fix or delete that line."
    if isinstance(error, StopIteration):
        return f"{key} ({path}) holds no rows."
    detail = f"{type(cause).__name__}: {cause}" if cause is not error else f"{type(error).__name__}: {error}"
    return f"{key} ({path}) could not be loaded: {detail.strip()[:500]}"


def load_prompt_pool(selfee_cfg, round_sizes: list[int] | None = None) -> PromptPool:
    """Load every `selfee.prompts` entry with Axolotl's dataset loader and extract one chat prompt per row.

    Rows with a missing or empty prompt are skipped and counted. The pool is shuffled once with
    `selfee.shuffle_seed`, so chunks are the same on every run and resuming never reuses a prompt.

    Raises:
        ValueError: a dataset yields no usable prompt, or the pool is smaller than the rounds ask for.
    """
    from axolotl.utils.data.shared import load_dataset_with_config
    from axolotl.utils.dict import DictDefault

    ids, messages, skipped = [], [], Counter()
    for idx, entry in enumerate(selfee_cfg.prompts or []):
        loader_cfg = DictDefault(entry.model_dump(exclude={"type"}, exclude_none=True))
        try:
            rows = list(load_dataset_with_config(loader_cfg, use_auth_token=False))
        except Exception as error:  # the loader's errors name neither the key nor the line; ours must
            raise ValueError(describe_load_error(f"selfee.prompts[{idx}]", entry.path, error)) from error
        extract = EXTRACTORS[entry.type]
        kept = 0
        for row_idx, row in enumerate(rows):
            prompt = extract(row, entry)
            if prompt is None:
                skipped[f"selfee.prompts[{idx}] missing or empty prompt"] += 1
                continue
            if entry.field_system and isinstance(row.get(entry.field_system), str) and row[entry.field_system]:
                prompt = [{"role": "system", "content": row[entry.field_system]}] + prompt
            ids.append(f"{idx}:{row_idx}")
            messages.append(prompt)
            kept += 1
        if kept == 0:
            raise ValueError(
                f"selfee.prompts[{idx}] ({entry.path}) has no usable prompt in {len(rows)} rows with "
                f"type: {entry.type}; check the type and the field names (field_messages={entry.field_messages!r}, "
                f"field_prompt={entry.field_prompt!r}, field_chosen={entry.field_chosen!r})."
            )
    for reason, count in skipped.items():
        LOG.warning(f"{reason}: {count} row(s) skipped")

    order = list(range(len(ids)))
    random.Random(selfee_cfg.shuffle_seed).shuffle(order)
    pool = PromptPool([ids[i] for i in order], [messages[i] for i in order], skipped)
    needed = sum(round_sizes or [])
    if needed > len(pool):
        raise ValueError(
            f"selfee.rounds asks for {needed} prompts ({round_sizes}) but selfee.prompts holds only {len(pool)} "
            "usable prompts; lower the round sizes or add prompts."
        )
    return pool
