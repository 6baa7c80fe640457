"""Several processes under torchrun on CPU (gloo): a round resumed across a world-size change, and the loop through
the CLI with two processes, killed and finished under one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from helpers import TESTS_DIR, _rows, tiny_rounds_config

from selfee_plugin.artifacts import pairs_part_paths, read_judged_rows

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


# ---------------------------------------------------------------------------------------- torchrun, gloo


def _torchrun_env() -> dict:
    # One thread per process: two processes share the 2 CI cores. No accelerator anywhere on this path.
    # tests/ on the path: the worker imports helpers.
    path = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def test_a_round_killed_under_one_process_finishes_under_two_judging_each_prompt_once(tiny_model_dir, tmp_path):
    """Resume across a world-size change, 1 -> 2, on the real collectives (torchrun, gloo): 3 of 8 prompts were
    judged by a one-process run that was killed mid-row; 2 ranks deal the 5 others, the merged file holds all 8 in
    pool order, the 3 old rows untouched, and both ranks report the same metrics."""
    from helpers import MESSAGES, _lora
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfee_plugin.annotate import annotate
    from selfee_plugin.args import SelfeeConfig

    selfee = {"rounds": [8], "prompts": [{"path": "unused.jsonl"}], "judge": {"batch_tokens": 256},
              "generation": {"max_new_tokens": 6, "batch_size": 2, "chunk_size": 2, "temperature": 1.0}}
    prompts = [(f"0:{k}", MESSAGES[k % len(MESSAGES)]) for k in (5, 2, 7, 0, 3, 6, 1, 4)]
    (tmp_path / "selfee.json").write_text(json.dumps(selfee))
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    pairs = tmp_path / "round_1" / "pairs.jsonl"
    pairs.parent.mkdir()
    model = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), seed=0)
    annotate(model, AutoTokenizer.from_pretrained(tiny_model_dir), prompts[:3], SelfeeConfig(**selfee), beta=0.1,
             out_path=str(pairs), seed=43, max_length=64)
    before = pairs.read_text()
    with open(pairs, "a") as f:
        f.write('{"prompt_id": "0:0", "messa')  # the row being written when the process was killed

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), tiny_model_dir, str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=_torchrun_env(),
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    received = [set(r["received"]) for r in ranks]
    assert received[0] | received[1] == {pid for pid, _ in prompts[3:]} and not received[0] & received[1]
    assert sorted(map(len, received)) == [2, 3]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    metrics = ranks[0]["metrics"]
    assert metrics["selfee/prompts_resumed"] == 3 and metrics["selfee/world_size"] == 2
    assert metrics["selfee/prompts_annotated"] == 5
    assert metrics["selfee/prompts_judged"] == 8
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == [pid for pid, _ in prompts]
    assert pairs.read_text().startswith(before) and pairs_part_paths(pairs) == []


# ---------------------------------------------------------------------------------------- the CLI, end to end


def _axolotl_train(cfg: dict, workdir: Path, nproc: int) -> list[str]:
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    axolotl = os.path.join(os.path.dirname(sys.executable), "axolotl")
    command = [axolotl, "train", str(path)]
    # --standalone: a free rendezvous port, so a stale process or a parallel job on 29500 cannot collide.
    return command + (["--launcher", "torchrun", "--", "--standalone", "--nproc_per_node", str(nproc)]
                      if nproc > 1 else [])


def _run(command: list[str], workdir: Path) -> str:
    proc = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600, env=_torchrun_env())
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"axolotl train failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def _one_process_prompt_ids(cfg: dict) -> list[list[str]]:
    """The prompt ids a one-process run judges in each round, in order: the pool's fixed chunks."""
    from selfee_plugin.args import SelfeeConfig
    from selfee_plugin.prompt_pool import load_prompt_pool

    selfee = SelfeeConfig(**cfg["selfee"])
    chunks = load_prompt_pool(selfee, selfee.round_sizes).chunks(selfee.round_sizes)
    return [[pid for pid, _ in chunk] for chunk in chunks]


def test_two_processes_through_the_cli_run_every_round_judging_each_prompt_once(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    out = tmp_path / "out"
    cfg = tiny_rounds_config(tiny_model_dir, tiny_data_dir, out, rounds=[6, 6], batch_size=2)
    output = _run(_axolotl_train(cfg, tmp_path, nproc=2), tmp_path)
    assert "2 processes without an accelerator: model loaded with device_map {'': 'cpu'}" in output
    for t in (1, 2):
        assert f"selfee round {t}: 6 prompt(s) sharded over 2 processes" in output

    root = out / "selfee"
    assert [row["selfee/round"] for row in json.loads((root / "summary.json").read_text())] == [0, 1, 2]
    assert json.loads((root / "state.json").read_text())["completed"] == [0, 1, 2]
    for t, expected in zip((1, 2), _one_process_prompt_ids(cfg)):
        pairs = root / f"round_{t}" / "pairs.jsonl"
        assert [r["prompt_id"] for r in _rows(pairs)] == expected  # each once, in the one-process order
        assert pairs_part_paths(pairs) == []
        metrics = json.loads((root / f"round_{t}" / "metrics.json").read_text())
        assert metrics["selfee/world_size"] == 2 and metrics["selfee/prompts_judged"] == 6
        assert metrics["selfee/prompts_annotated"] == 6  # 6 distinct ids in the file, 6 handed out: none twice
        assert metrics["selfee/pairs"] == sum(r["chosen_index"] is not None for r in _rows(pairs))
        assert metrics["selfee/seconds_generate"] > 0 and metrics["selfee/generation_tokens_per_second"] > 0
        assert (root / f"round_{t}" / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "adapter_model.safetensors").exists()


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker at once (torchrun starts its workers in sessions of their own)."""
    import psutil

    tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(pid) and
                                              psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in tree):
        time.sleep(0.1)


def test_two_process_run_killed_in_round_2_finishes_under_one_process(tiny_model_dir, tiny_data_dir, tmp_path):
    """Resume across a world-size change, 2 -> 1, through the CLI: kill every process while round 2 is being
    generated and judged (one prompt per chunk, so per written row), rerun with one process: nothing lost, nothing
    judged twice, the rows written before the kill kept as they were."""
    out = tmp_path / "out"
    rounds = [4, 16]
    cfg = tiny_rounds_config(tiny_model_dir, tiny_data_dir, out, rounds=rounds, batch_size=1)
    round_2 = out / "selfee" / "round_2"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_axolotl_train(cfg, tmp_path, nproc=2), cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, env=_torchrun_env())

    def written() -> list[dict]:
        return [r for part in pairs_part_paths(round_2 / "pairs.jsonl") for r in read_judged_rows(part)]

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if 0 < len(written()) < rounds[1] // 2:
            _kill_tree(proc)
            break
        time.sleep(0.05)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    before = {r["prompt_id"]: r for r in written()}
    assert len(before) == len(written())  # the two ranks' part files share no prompt
    assert 0 < len(before) < rounds[1] and not (round_2 / "pairs.jsonl").exists()
    assert not (round_2 / "metrics.json").exists()

    output = _run(_axolotl_train(cfg, tmp_path, nproc=1), tmp_path)
    assert "selfee round 1 already finished" in output
    root = out / "selfee"
    assert [row["selfee/round"] for row in json.loads((root / "summary.json").read_text())] == [0, 1, 2]
    expected = _one_process_prompt_ids(cfg)
    assert [r["prompt_id"] for r in _rows(root / "round_1" / "pairs.jsonl")] == expected[0]
    rows = _rows(round_2 / "pairs.jsonl")
    assert [r["prompt_id"] for r in rows] == expected[1]  # all 16, once each
    assert pairs_part_paths(round_2 / "pairs.jsonl") == []
    for row in rows:
        if row["prompt_id"] in before:
            assert row == before[row["prompt_id"]]  # kept, not judged again
    metrics = json.loads((round_2 / "metrics.json").read_text())
    assert metrics["selfee/prompts_resumed"] == len(before) and metrics["selfee/world_size"] == 1
    assert metrics["selfee/prompts_annotated"] == rounds[1] - len(before)
    assert metrics["selfee/prompts_judged"] == rounds[1]
