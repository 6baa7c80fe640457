"""What a SELFEE run writes under `output_dir/selfee/`, defined once: layout, skip reasons, and crash-safe I/O.

    selfee/state.json              fingerprint of the run + finished rounds (resume)
    selfee/summary.json            one metrics row per finished round
    selfee/eval_pairs_auto.jsonl   the seed pairs `judge.eval_pairs: auto` held out of round 0
    selfee/round_<t>/pairs.jsonl   one judged row per prompt (see `annotate.annotate`), in the round's prompt order
    selfee/round_<t>/pairs.rank<r>.jsonl  rank r's rows while several processes judge the round; merged into
                                   pairs.jsonl by rank 0 when every rank is done (see `merge_pairs_parts`)
    selfee/round_<t>/metrics.json  the round's metrics
    selfee/round_<t>/to_label.jsonl  the round's pairs exported for on-policy labels (`selfee.labels`)
    selfee/round_<t>/adapter/      the policy after round t (`model/` under full fine-tuning)
    selfee/round_<t>/checkpoints/  the round's HF Trainer checkpoints (`checkpoints_attempt_<k>/` for a guard retry),
                                   each with the noise window beside the optimizer state (`selfee_noise_state.json`)
    selfee/round_<t>/rejected/attempt_<k>/  an attempt the guard rejected: its policy and metrics
    selfee/report.md, report.png   the run's report (`report.py`)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = "selfee"
STATE_FILE = "state.json"
SUMMARY_FILE = "summary.json"
PAIRS_FILE = "pairs.jsonl"
METRICS_FILE = "metrics.json"
AUTO_EVAL_FILE = "eval_pairs_auto.jsonl"
TO_LABEL_FILE = "to_label.jsonl"
NOISE_STATE_FILE = "selfee_noise_state.json"
REPORT_FILE = "report.md"
PLOT_FILE = "report.png"

# Why a prompt produced no pair; each is counted in the metrics as `metric_keys.skipped(reason)`.
PROMPT_TOO_LONG = "prompt_too_long"
EMPTY_RESPONSE = "empty_response"
IDENTICAL_RESPONSES = "identical_responses"
REWARD_TIE = "reward_tie"
SKIP_REASONS = (PROMPT_TOO_LONG, EMPTY_RESPONSE, IDENTICAL_RESPONSES, REWARD_TIE)


def selfee_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / ROOT


def round_dir(root: Path, round_idx: int) -> Path:
    path = root / f"round_{round_idx}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def policy_dir(root: Path, round_idx: int, peft: bool) -> Path:
    """Where round `round_idx` keeps its policy; a path only (asking whether one exists creates nothing)."""
    return policy_in(root / f"round_{round_idx}", peft)


def policy_in(folder: Path, peft: bool) -> Path:
    """A policy's folder inside `folder`: its LoRA adapter, or the whole model under full fine-tuning."""
    return folder / ("adapter" if peft else "model")


def checkpoints_dir(root: Path, round_idx: int, attempt: int = 1) -> Path:
    """Where an attempt of round `round_idx` keeps its HF checkpoints (`checkpoint-<step>` restarts at 1 each time)."""
    return round_dir(root, round_idx) / ("checkpoints" if attempt == 1 else f"checkpoints_attempt_{attempt}")


def rejected_dir(root: Path, round_idx: int, attempt: int) -> Path:
    """Where the guard keeps an attempt it rejected: its policy and metrics."""
    path = round_dir(root, round_idx) / "rejected" / f"attempt_{attempt}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, data) -> None:
    """Atomic: a kill never leaves half a metrics or state file."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=float)))


def write_atomic(path: Path, write) -> None:
    """`write(tmp)` to a temporary file beside `path` (same suffix, so writers that read it still work), then
    rename it over `path`: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def repair_tail(path: str | os.PathLike, block: int = 1 << 16) -> None:
    """Cut a partial last line left by a crash mid-write; appending after it would corrupt the next row."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        pos = f.seek(0, os.SEEK_END)
        f.seek(pos - 1)
        if f.read(1) == b"\n":
            return
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            newline = f.read(step).rfind(b"\n")
            if newline >= 0:
                f.truncate(pos + newline + 1)
                return
        f.truncate(0)


def read_judged_rows(path: str | os.PathLike) -> list[dict]:
    """Every complete row of a judged-pairs JSON Lines file (a partial last line from a crash is ignored)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                rows.append(json.loads(line))
    return rows


def pairs_part_path(pairs_path: str | os.PathLike, rank: int) -> Path:
    """Rank `rank`'s own judged-rows file beside the round's `pairs.jsonl` (several processes only)."""
    path = Path(pairs_path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def pairs_part_paths(pairs_path: str | os.PathLike) -> list[Path]:
    """Every rank's part file of the round, from this run or from an earlier run with any number of processes."""
    path = Path(pairs_path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))


def read_round_rows(pairs_path: str | os.PathLike) -> list[dict]:
    """The round's judged rows wherever they are (`pairs.jsonl`, then the part files), one per prompt id (first kept).

    A prompt id appears twice only when a crash fell between a merge's rename and its removal of the part files; both
    rows are the same row then.
    """
    rows, seen = [], set()
    for path in [Path(pairs_path), *pairs_part_paths(pairs_path)]:
        for row in read_judged_rows(path):
            if row["prompt_id"] not in seen:
                seen.add(row["prompt_id"])
                rows.append(row)
    return rows


def merge_pairs_parts(pairs_path: str | os.PathLike, order: list[str]) -> int:
    """Fold the round's part files into `pairs.jsonl`, rows in the round's prompt order; no-op without part files.

    The merged file replaces `pairs.jsonl` atomically before the parts are removed, so a kill at any point leaves
    every judged row readable by `read_round_rows`. The order is the one-process run's (it judges prompts in pool
    order), so the DPO dataset built from the file does not depend on how many processes judged it.

    Args:
        order: the round's prompt ids in pool order; rows of other ids (none in a consistent run) go last.

    Returns:
        rows in the merged file (0 when there was nothing to merge).
    """
    parts = pairs_part_paths(pairs_path)
    if not parts:
        return 0
    position = {prompt_id: i for i, prompt_id in enumerate(order)}
    rows = sorted(read_round_rows(pairs_path), key=lambda row: position.get(row["prompt_id"], len(order)))
    write_rows(Path(pairs_path), rows)
    for part in parts:
        part.unlink()
    return len(rows)


def write_rows(path: Path, rows: list[dict]) -> None:
    """A whole JSON Lines file, durable and atomic (`write_atomic`)."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            append_rows(f, rows)

    write_atomic(path, write)


def append_rows(f, rows: list[dict]) -> None:
    """Append rows to an open JSON Lines file and make them durable before the next chunk of work starts."""
    for row in rows:
        f.write(json.dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())


def judged_pairs_dataset(rows: list[dict], reference: str = "previous"):
    """Judged pairs as a `datasets.Dataset` that TRL 1.9's DPOTrainer tokenizes like an Axolotl DPO dataset.

    Args:
        rows: judged rows (`pairs.jsonl`); unpaired rows are left out.
        reference: which judged log-probs become the DPO reference columns: `previous` (log pi_cur, the paper's
            pi_{t-1}) or `initial` (the judge's reference, pi_init), as `selfee.dpo_reference`.

    Returns:
        Dataset with `prompt`, `chosen`, `rejected` (formatted strings), `ref_chosen_logps`, `ref_rejected_logps`.
    """
    from datasets import Dataset

    if reference not in ("previous", "initial"):
        raise ValueError(f"reference must be `previous` or `initial` (selfee.dpo_reference), got {reference!r}")
    key = "policy_logps" if reference == "previous" else "ref_logps"
    columns = {k: [] for k in ("prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")}
    for row in rows:
        w, l = row["chosen_index"], row["rejected_index"]
        if w is None:
            continue
        columns["prompt"].append(row["prompt"])
        columns["chosen"].append(row["completions"][w])
        columns["rejected"].append(row["completions"][l])
        columns["ref_chosen_logps"].append(row[key][w])
        columns["ref_rejected_logps"].append(row[key][l])
    return Dataset.from_dict(columns)
