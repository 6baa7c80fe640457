"""Several processes, in one: prompt shards, metric reduction and refused setups. The runs under torchrun on CPU
(gloo) are in tests/e2e/test_distributed_e2e.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from selfee_plugin import distributed


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
