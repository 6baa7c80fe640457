"""Several processes: prompt shards, metric reduction, refused setups, and the loop under torchrun on CPU (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import tiny_train_config

from selfee_plugin import distributed
from selfee_plugin.artifacts import pairs_part_paths, read_judged_rows

TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------- shards and metrics


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_prompt_goes_to_exactly_one_rank_and_shards_differ_by_at_most_one(world):
    items = [(f"0:{k}", [{"role": "user", "content": str(k)}]) for k in range(10)]
    shards = [distributed.shard(items, r, world) for r in range(world)]
    ids = [pid for s in shards for pid, _ in s]
    assert sorted(ids) == sorted(pid for pid, _ in items) and len(ids) == len(set(ids))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards[0][0] == items[0] and (world == 1 or shards[1][0] == items[1])  # dealt in pool order


def test_rank_metrics_reduce_to_the_rounds_wall_time_throughput_and_batch():
    """2 ranks ran at once: the round waited for the slower (max seconds), produced tokens at the sum of the rates,
    judged the sum of their shards; the smallest batch a rank used is reported, a rank with nothing to generate
    (batch 0) is not counted; other keys come from rank 0."""
    rank0 = {"selfee/prompts_annotated": 3.0, "selfee/seconds_generate": 3.0, "selfee/seconds_judge": 1.0,
             "selfee/generation_tokens_per_second": 100.0, "selfee/judge_tokens_per_second": 1000.0,
             "selfee/generation_batch_prompts": 8.0, "selfee/other": 7.0}
    rank1 = {"selfee/prompts_annotated": 2.0, "selfee/seconds_generate": 5.0, "selfee/seconds_judge": 0.5,
             "selfee/generation_tokens_per_second": 60.0, "selfee/judge_tokens_per_second": 900.0,
             "selfee/generation_batch_prompts": 4.0, "selfee/other": 9.0}
    idle = {**rank1, "selfee/generation_batch_prompts": 0.0}
    assert distributed.reduce_metrics([rank0, rank1]) == {
        "selfee/prompts_annotated": 5.0, "selfee/seconds_generate": 5.0, "selfee/seconds_judge": 1.0,
        "selfee/generation_tokens_per_second": 160.0, "selfee/judge_tokens_per_second": 1900.0,
        "selfee/generation_batch_prompts": 4.0, "selfee/other": 7.0,
    }
    assert distributed.reduce_metrics([rank0, idle])["selfee/generation_batch_prompts"] == 8.0
    assert distributed.reduce_metrics([rank0]) == rank0
    # judge accuracy: 3 of 4 right on rank 0, 0 of 1 on rank 1 -> 3 of 5 over the held-out set
    assert distributed.weighted_mean([(0.75, 4), (0.0, 1)]) == pytest.approx(0.6)
    assert distributed.weighted_mean([(0.0, 0), (0.0, 0)]) == 0.0


def test_one_process_is_rank_0_of_1():
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.broadcast({"a"}) == {"a"} and distributed.gather(3) == [3]
    distributed.barrier()  # no process group: returns


def test_processes_that_would_each_train_alone_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    lonely = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1, distributed_type="NO"))
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 processes, but the trainer runs 1 .*ACCELERATE_USE_CPU"):
        distributed.check_world(lonely)
    distributed.check_world(SimpleNamespace(accelerator=SimpleNamespace(num_processes=2)))


# ---------------------------------------------------------------------------------------- refused setups


@pytest.fixture
def no_launcher_env(monkeypatch):
    for key in ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def _zero_config(tmp_path, stage: int) -> str:
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto"}))
    return str(path)


@pytest.mark.parametrize("setting,env,named", [
    ("zero3_file", {}, r"deepspeed: .*zero3\.json \(zero_optimization\.stage: 3\)"),
    ({"deepspeed": {"zero_optimization": {"stage": 3}}}, {}, r"zero_optimization\.stage: 3"),
    ({"fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True}}, {}, r"fsdp_config: \{'fsdp_version': 2"),
    ({"tensor_parallel_size": 2}, {}, r"tensor_parallel_size: 2"),
    ({"context_parallel_size": 4}, {}, r"context_parallel_size: 4"),
    ({}, {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, r"ACCELERATE_DEEPSPEED_ZERO_STAGE=3"),
    ({}, {"ACCELERATE_USE_FSDP": "true"}, r"ACCELERATE_USE_FSDP=true"),
])
def test_sharded_weights_are_refused_naming_the_key_the_value_and_what_works(
    setting, env, named, no_launcher_env, tmp_path
):
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault({"deepspeed": _zero_config(tmp_path, 3)} if setting == "zero3_file" else setting)
    for key, value in env.items():
        no_launcher_env.setenv(key, value)
    with pytest.raises(ValueError, match=named) as error:
        distributed.check_parallelism(cfg)
    message = str(error.value)
    assert "shard the model's weights" in message
    assert "--launcher torchrun -- --nproc_per_node N" in message and "ZeRO-2" in message


def test_setups_where_every_rank_holds_the_whole_model_are_accepted(no_launcher_env, tmp_path):
    from axolotl.utils.dict import DictDefault

    for cfg in ({}, {"deepspeed": _zero_config(tmp_path, 2)}, {"deepspeed": {"zero_optimization": {"stage": 1}}},
                {"tensor_parallel_size": 1, "context_parallel_size": None}):
        distributed.check_parallelism(DictDefault(cfg))
    no_launcher_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    distributed.check_parallelism(DictDefault({"deepspeed": _zero_config(tmp_path, 2)}))  # the config file decides


def test_the_plugin_refuses_zero3_in_pre_model_load_which_axolotl_calls_before_building_the_model(
    no_launcher_env, tmp_path
):
    """The refusal comes first in `pre_model_load` (before the prompt pool is even read), and Axolotl 0.19's
    `ModelLoader.load` runs that hook before `_build_model` loads any weight."""
    import inspect

    from axolotl.loaders.model import ModelLoader
    from axolotl.utils.dict import DictDefault

    from selfee_plugin.plugin import SelfeePlugin

    cfg = DictDefault({"rl": "dpo", "deepspeed": _zero_config(tmp_path, 3), "output_dir": str(tmp_path / "out"),
                       "selfee": {"rounds": [4], "prompts": [{"path": str(tmp_path / "absent.jsonl")}]}})
    with pytest.raises(ValueError, match=r"selfee cannot run with deepspeed: .*zero3\.json"):
        SelfeePlugin().pre_model_load(cfg)
    source = inspect.getsource(ModelLoader.load)
    assert source.index("PLUGIN_MANAGER.pre_model_load(") < source.index("self._build_model()"), (
        "Axolotl's ModelLoader.load no longer calls pre_model_load before building the model: move the refusal"
    )


# ---------------------------------------------------------------------------------------- torchrun, gloo


def _torchrun_env() -> dict:
    # One thread per process: two processes share the 2 CI cores. No accelerator anywhere on this path.
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
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
         str(TESTS / "distributed_worker.py"),
         tiny_model_dir, str(tmp_path)],
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


def _selfee_cfg(model_dir, data_dir, out, rounds, batch_size):
    selfee = {
        "rounds": rounds, "seed_epochs": 1,
        "prompts": [{"path": f"{data_dir}/prompts.jsonl", "ds_type": "json", "type": "prompt"}],
        "generation": {"max_new_tokens": 8, "batch_size": batch_size, "chunk_size": batch_size, "temperature": 1.0},
        "judge": {"batch_tokens": 256},
    }
    return tiny_train_config(model_dir, data_dir, str(out), selfee=selfee)


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


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.e2e
def test_two_processes_through_the_cli_run_every_round_judging_each_prompt_once(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    out = tmp_path / "out"
    cfg = _selfee_cfg(tiny_model_dir, tiny_data_dir, out, rounds=[6, 6], batch_size=2)
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


@pytest.mark.e2e
def test_two_process_run_killed_in_round_2_finishes_under_one_process(tiny_model_dir, tiny_data_dir, tmp_path):
    """Resume across a world-size change, 2 -> 1, through the CLI: kill every process while round 2 is being
    generated and judged (one prompt per chunk, so per written row), rerun with one process: nothing lost, nothing
    judged twice, the rows written before the kill kept as they were."""
    out = tmp_path / "out"
    rounds = [4, 16]
    cfg = _selfee_cfg(tiny_model_dir, tiny_data_dir, out, rounds=rounds, batch_size=1)
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
