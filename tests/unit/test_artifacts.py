"""The round's judged-rows files under several processes: part files, their merge, and reading a round after a kill."""

from __future__ import annotations

import json
import random

from selfee_plugin.artifacts import (
    judged_pairs_dataset,
    merge_pairs_parts,
    pairs_part_path,
    pairs_part_paths,
    read_judged_rows,
    read_round_rows,
)


def _row(prompt_id: str) -> dict:
    """A judged row with a pair whose numbers are unique to the prompt, so a misplaced row shows in the dataset."""
    k = int(prompt_id.split(":")[1])
    return {
        "prompt_id": prompt_id, "prompt": f"<|user|> sort {k} <|end|> <|assistant|> ",
        "completions": [f"{k} a <|end|>", f"{k} b <|end|>"], "policy_logps": [-k - 1.0, -k - 2.0],
        "ref_logps": [-k - 1.5, -k - 1.25], "chosen_index": k % 2, "rejected_index": 1 - k % 2, "probability": 0.6,
        "skip_reason": None,
    }


def _write(path, rows, partial_tail: str = "") -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write(partial_tail)


def test_merged_round_file_and_dpo_dataset_equal_the_one_process_ones(tmp_path):
    """Rows judged by 3 ranks in shard order (plus a few from an earlier one-process run) merge into the file a
    single process would have written: same rows, pool order; the DPO dataset built from it is the same too."""
    order = [f"0:{k}" for k in random.Random(0).sample(range(40), 10)]  # the round's prompts, in pool order
    one_process = tmp_path / "one" / "pairs.jsonl"
    one_process.parent.mkdir()
    _write(one_process, [_row(pid) for pid in order])

    pairs = tmp_path / "three" / "pairs.jsonl"
    pairs.parent.mkdir()
    _write(pairs, [_row(pid) for pid in order[:2]])  # judged before a kill, by one process
    rest = order[2:]
    for rank in range(3):
        _write(pairs_part_path(pairs, rank), [_row(pid) for pid in rest[rank::3]], partial_tail='{"prompt_id": "0:')
    assert [p.name for p in pairs_part_paths(pairs)] == ["pairs.rank0.jsonl", "pairs.rank1.jsonl", "pairs.rank2.jsonl"]

    assert merge_pairs_parts(pairs, order) == len(order)
    assert pairs.read_text() == one_process.read_text()
    assert pairs_part_paths(pairs) == [] and not list(pairs.parent.glob("*.tmp*"))
    for reference in ("previous", "initial"):
        merged = judged_pairs_dataset(read_judged_rows(pairs), reference)
        assert merged.to_dict() == judged_pairs_dataset(read_judged_rows(one_process), reference).to_dict()
    assert merge_pairs_parts(pairs, order) == 0  # nothing left to merge: the file is not rewritten


def test_a_kill_between_the_merge_rename_and_the_part_removal_loses_and_repeats_nothing(tmp_path):
    """The merged file is in place but the parts are still there: the round reads each prompt once, and the next
    merge writes each once."""
    order = ["0:3", "0:1", "0:2", "0:0"]
    pairs = tmp_path / "pairs.jsonl"
    _write(pairs, [_row(pid) for pid in order])
    _write(pairs_part_path(pairs, 0), [_row("0:3"), _row("0:2")])
    _write(pairs_part_path(pairs, 1), [_row("0:1"), _row("0:0")])

    assert [r["prompt_id"] for r in read_round_rows(pairs)] == order
    merge_pairs_parts(pairs, order)
    assert [r["prompt_id"] for r in read_judged_rows(pairs)] == order


def test_round_rows_gather_every_file_of_a_round_killed_under_any_world_size(tmp_path):
    """After a kill, what was judged is spread over pairs.jsonl and part files of another world size; a partial last
    line (the row being written) is not a judged prompt."""
    pairs = tmp_path / "pairs.jsonl"
    _write(pairs, [_row("0:5")], partial_tail='{"prompt_id": "0:6", "pro')
    _write(pairs_part_path(pairs, 3), [_row("0:7")])  # rank 3 of an earlier 4-process run
    assert {r["prompt_id"] for r in read_round_rows(pairs)} == {"0:5", "0:7"}
    assert read_round_rows(tmp_path / "missing" / "pairs.jsonl") == []
