"""On-policy label check (beyond the paper): a few of each round's own pairs labelled by a person or a function.

Held-out human pairs measure the judge on *old* samples; the round guard needs its accuracy on the current policy's
samples, where the demo's failures showed while held-out accuracy still read well (`benchmarks/README.md`, "Round
signals"). Each round exports the pairs the judge is least sure of, unequal-length
pairs first (the length bias lives there), to `round_<t>/to_label.jsonl`. A label says which of the judge's
`chosen` / `rejected` answers is better (`chosen`, `rejected` or `tie`); labelled pairs override the judge's label in
the round's training data (`tie` drops the pair).
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

from . import distributed
from . import metric_keys as keys
from ._logging import get_logger
from .artifacts import TO_LABEL_FILE, write_rows

LOG = get_logger(__name__)

LABELS = ("chosen", "rejected", "tie")


class LabelsNeeded(SystemExit):
    """Stops the run until a person labels the exported pairs; a rerun with the same config continues."""


def label_count(per_round: float, prompts: int, pairs: int) -> int:
    """Pairs to label: a share of the round's prompts (< 1) or a count (>= 1), at most its judged pairs."""
    if per_round <= 0 or pairs == 0:
        return 0
    return min(pairs, int(per_round) if per_round >= 1 else max(1, math.ceil(per_round * prompts)))


def select_for_labels(rows: list[dict], count: int) -> list[dict]:
    """The `count` paired rows the judge is least sure of (probability nearest 1/2), unequal-length pairs first."""

    def key(row):
        lengths = row["completion_lengths"]
        return (lengths[row["chosen_index"]] == lengths[row["rejected_index"]], row["probability"], row["prompt_id"])

    return sorted((r for r in rows if r.get("chosen_index") is not None), key=key)[:count]


def load_labeller(spec: str):
    module, name = spec.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"selfee.labels.function {spec!r} cannot be imported ({error}); give `module.path:callable` importable "
            "from the training environment (PYTHONPATH)."
        ) from error


def _export_row(row: dict) -> dict:
    w, l = row["chosen_index"], row["rejected_index"]
    return {"prompt_id": row["prompt_id"], "messages": row["messages"], "chosen": row["responses"][w],
            "rejected": row["responses"][l], "judge_probability": row["probability"], "label": None}


def read_labels(path: Path) -> dict[str, str]:
    """`prompt_id -> label` from a to_label file; raises `LabelsNeeded` naming each line without a valid label."""
    labels, missing = {}, []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise LabelsNeeded(f"{path} line {line_no} is not valid JSON ({error.msg}); fix it and rerun.")
            label = row.get("label")
            if label in LABELS:
                labels[str(row["prompt_id"])] = label
            else:
                missing.append(f"line {line_no}: label {label!r}")
    if missing:
        raise LabelsNeeded(
            f"selfee.labels: {len(missing)} of {len(missing) + len(labels)} pair(s) in {path} have no valid label "
            f"({'; '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}). Set `label` on each line to one of "
            f"{', '.join(LABELS)} (is the `chosen` answer better, the `rejected` one, or neither?) and rerun the same "
            "command: the run continues from this round."
        )
    return labels


def round_labels(rows: list[dict], labels_cfg, round_dir: Path) -> dict[str, str]:
    """The round's labels (`prompt_id -> label`): by `labels.function`, or read from a file a person filled in.

    Writes `round_dir/to_label.jsonl` once (with the function's labels, or empty labels to fill in) and reads it on
    every later call, so a rerun continues with the same labels. Raises `LabelsNeeded` while labels are missing.
    """
    path = round_dir / TO_LABEL_FILE
    if not path.exists():
        pairs = sum(r.get("chosen_index") is not None for r in rows)
        chosen = select_for_labels(rows, label_count(labels_cfg.per_round, len(rows), pairs))
        if not chosen:
            return {}
        if labels_cfg.function:
            labeller = load_labeller(labels_cfg.function)
            exported = []
            for row in chosen:
                out = _export_row(row)
                out["label"] = labeller(out["messages"], out["chosen"], out["rejected"])
                if out["label"] not in LABELS:
                    raise ValueError(f"selfee.labels.function returned {out['label']!r}; allowed: {', '.join(LABELS)}.")
                exported.append(out)
        else:
            exported = [_export_row(row) for row in chosen]
        write_rows(path, exported)
        if not labels_cfg.function:
            raise LabelsNeeded(
                f"selfee.labels: {len(exported)} of this round's pairs are waiting for labels in {path}. On each line "
                "set `label` to `chosen` (the `chosen` answer is better), `rejected` (the `rejected` one is) or `tie`, "
                "then rerun the same command: the run continues from this round with your labels."
            )
    return read_labels(path)


def shared_round_labels(rows: list[dict], labels_cfg, round_dir: Path) -> dict[str, str]:
    """`round_labels` on rank 0 (it writes `to_label.jsonl` and may call the labeller); every rank gets the same
    labels, or raises the same stop or error, so no rank waits for another that has left."""
    outcome = None
    if distributed.is_main():
        try:
            outcome = round_labels(rows, labels_cfg, round_dir)
        except (Exception, LabelsNeeded) as error:
            outcome = error
    outcome = distributed.broadcast(outcome)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def apply_labels(rows: list[dict], labels: dict[str, str]) -> tuple[list[dict], dict[str, float]]:
    """Rows with the labels applied (`rejected` swaps the pair, `tie` drops it) and the agreement metrics.

    Returns:
        rows: copies where a label changed the pair; `LABELS`, `LABELS_FLIPPED` and `JUDGE_ACCURACY_ON_POLICY` (the
        judge's agreement with the non-tie labels).
    """
    if not labels:
        return rows, {}
    out, agree = [], []
    for row in rows:
        label = labels.get(row["prompt_id"])
        if label is None or row.get("chosen_index") is None:
            out.append(row)
            continue
        if label != "tie":
            agree.append(float(label == "chosen"))
        if label == "rejected":
            row = {**row, "chosen_index": row["rejected_index"], "rejected_index": row["chosen_index"]}
        elif label == "tie":
            row = {**row, "chosen_index": None, "rejected_index": None}
        out.append(row)
    metrics = {keys.LABELS: float(len(labels)), keys.LABELS_FLIPPED: float(len(agree) - sum(agree))}
    if agree:
        metrics[keys.JUDGE_ACCURACY_ON_POLICY] = sum(agree) / len(agree)
    return out, metrics
