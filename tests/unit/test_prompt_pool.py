"""Prompt-pool loading and extraction through Axolotl's dataset loader."""

from __future__ import annotations

import json

import pytest

from selfee_plugin.args import SelfeeConfig
from selfee_plugin.prompt_pool import load_prompt_pool


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(path, rounds, **entry):
    return SelfeeConfig(rounds=rounds, prompts=[{"path": path, "ds_type": "json", **entry}])


def test_messages_type_drops_trailing_assistant_and_counts_skips(tmp_path):
    path = _write(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
        {"messages": []},
        {"other": 1},
    ])
    pool = load_prompt_pool(_cfg(path, [1], type="messages"), [1])
    assert sorted(m[-1]["content"] for m in pool.messages) == ["hi", "q"]
    assert all(m[-1]["role"] == "user" for m in pool.messages)
    assert sum(pool.skipped.values()) == 2


def test_prompt_and_ultrafeedback_types(tmp_path):
    path = _write(tmp_path / "uf.jsonl", [
        {"prompt": "a", "chosen": [{"role": "user", "content": "ignored"}, {"role": "assistant", "content": "x"}]},
        {"prompt": "", "chosen": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]},
        {"question": "c"},
    ])
    uf = load_prompt_pool(_cfg(path, [2], type="ultrafeedback"), [2])
    assert sorted(m[0]["content"] for m in uf.messages) == ["a", "b"]
    plain = load_prompt_pool(_cfg(path, [1], type="prompt", field_prompt="question"), [1])
    assert plain.messages == [[{"role": "user", "content": "c"}]]


def test_chunks_are_disjoint_and_stable(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(10)])
    cfg = _cfg(path, [3, 4], type="prompt")
    first, second = load_prompt_pool(cfg, [3, 4]), load_prompt_pool(cfg, [3, 4])
    chunks = first.chunks([3, 4])
    assert [len(c) for c in chunks] == [3, 4]
    assert not {i for i, _ in chunks[0]} & {i for i, _ in chunks[1]}
    assert chunks == second.chunks([3, 4])


def test_empty_pool_names_the_dataset(tmp_path):
    path = _write(tmp_path / "empty.jsonl", [{"prompt": ""}, {"other": "x"}])
    with pytest.raises(ValueError, match=r"selfee.prompts\[0\] .*empty.jsonl\) has no usable prompt in 2 rows"):
        load_prompt_pool(_cfg(path, [1], type="prompt"), [1])


def test_pool_smaller_than_rounds_is_rejected(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    with pytest.raises(ValueError, match=r"selfee.rounds asks for 6 prompts \(\[3, 3\]\) but .* only 5"):
        load_prompt_pool(_cfg(path, [3, 3], type="prompt"), [3, 3])
