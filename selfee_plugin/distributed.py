"""Several processes (torchrun / accelerate: DDP, DeepSpeed ZeRO-1/2): ranks, prompt shards, who writes, metric
reduction, and the sharded setups refused before any weights load (ZeRO-3, FSDP, tensor/context parallelism).

Each rank holds the whole model (DDP and ZeRO-1/2 shard gradients and optimizer state, never the weights), so each
generates and judges its own shard of a round's prompts from its unwrapped model, with no collective per token;
rank 0 merges the shards' rows and writes every shared file. Outside `torch.distributed` everything here is the
one-process identity (rank 0 of 1).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence, TypeVar

import torch.distributed as dist

from . import metric_keys as keys
from ._logging import get_logger

LOG = get_logger(__name__)

T = TypeVar("T")

WORKING_SETUPS = (
    "one process; several processes with DDP (`axolotl train cfg.yml --launcher torchrun -- --nproc_per_node N`, "
    "LoRA, QLoRA or full fine-tuning); or DeepSpeed ZeRO-1/ZeRO-2 (`deepspeed: deepspeed_configs/zero2.json`)"
)

# How each rank's annotation metrics combine into the round's (the judged-row statistics are instead recomputed from
# the merged pairs file). Seconds: the slowest rank, which the round waited for. Throughput: ranks run at once, so
# their rates add up. Batch: the smallest size a rank actually used (0 = the rank had no prompt to generate).
# Prompts generated and judged by this run: each rank's shard, so the sum counts a prompt judged twice twice.
REDUCTIONS: dict[str, str] = {
    keys.PROMPTS_ANNOTATED: "sum",
    keys.SECONDS_GENERATE: "max",
    keys.SECONDS_JUDGE: "max",
    keys.GENERATION_TOKENS_PER_SECOND: "sum",
    keys.JUDGE_TOKENS_PER_SECOND: "sum",
    keys.GENERATION_BATCH_PROMPTS: "min_positive",
}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0: the only process that writes state, summary, metrics, merged pairs and adapters."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (`obj` is ignored elsewhere), so all ranks act on one view of the files."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: T) -> list[T]:
    """`obj` of every rank, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: Sequence[T], rank_: int, world: int) -> list[T]:
    """Rank `rank_`'s share of `items`: every `world`-th item from its index, so shards differ by at most one item.

    Args:
        items: (prompt_id, chat turns) of a round's prompts not judged yet, in pool order; every rank must pass the
            same list (`broadcast` the ids already judged first).
    """
    return list(items[rank_::world])


def reduce_metrics(per_rank: list[dict[str, float]], reductions: dict[str, str] = REDUCTIONS) -> dict[str, float]:
    """Combine each rank's metrics into one dict: the keys of `reductions` by their rule, any other key from rank 0."""
    ops: dict[str, Callable[[list[float]], float]] = {
        "max": max,
        "sum": sum,
        "min_positive": lambda xs: min((x for x in xs if x > 0), default=0.0),
    }
    out = dict(per_rank[0])
    for key, op in reductions.items():
        values = [float(m[key]) for m in per_rank if key in m]
        if values:
            out[key] = float(ops[op](values))
    return out


def weighted_mean(values: list[tuple[float, int]]) -> float:
    """Mean of per-rank means, each weighted by its count (0.0 when no rank had any)."""
    total = sum(n for _, n in values)
    return sum(v * n for v, n in values) / total if total else 0.0


def check_world(trainer) -> None:
    """Refuse a launch whose processes would each train alone: the launcher started several, the trainer knows one.

    Raises:
        RuntimeError: `WORLD_SIZE` > 1 but the trainer's accelerator runs a single process (no process group).
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and trainer.accelerator.num_processes != launched:
        raise RuntimeError(
            f"selfee: the launcher started WORLD_SIZE={launched} processes, but the trainer runs "
            f"{trainer.accelerator.num_processes} (accelerate distributed_type "
            f"{trainer.accelerator.distributed_type}): each process would train its own copy on all the data and "
            "judge every prompt. On a machine without a GPU, launch with `accelerate launch --cpu` or set "
            "ACCELERATE_USE_CPU=true."
        )


# ---------------------------------------------------------------------------------------- refused setups


def _zero_stage(deepspeed) -> int | None:
    if isinstance(deepspeed, str) and os.path.isfile(deepspeed):
        with open(deepspeed, encoding="utf-8") as f:
            deepspeed = json.load(f)
    if isinstance(deepspeed, dict):
        stage = (deepspeed.get("zero_optimization") or {}).get("stage")
        return int(stage) if stage is not None else None
    return None


def sharded_parameter_setups(cfg) -> list[str]:
    """The settings of `cfg` (an Axolotl config) and the launch environment that shard the model's weights.

    Returns:
        one `key: value` description per such setting; empty when every rank holds the whole model.
    """
    found = []
    stage = _zero_stage(cfg.get("deepspeed"))
    env_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage == 3:
        found.append(f"deepspeed: {cfg.get('deepspeed') if isinstance(cfg.get('deepspeed'), str) else '{...}'} "
                     "(zero_optimization.stage: 3)")
    elif stage is None and env_stage == "3":
        found.append("ACCELERATE_DEEPSPEED_ZERO_STAGE=3 (accelerate config: zero_stage 3)")
    if cfg.get("fsdp_config") or cfg.get("fsdp"):
        found.append(f"fsdp_config: {dict(cfg.get('fsdp_config') or {}) or cfg.get('fsdp')!r}")
    elif os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        found.append("ACCELERATE_USE_FSDP=true (accelerate config: distributed_type FSDP)")
    for key in ("tensor_parallel_size", "context_parallel_size", "dp_shard_size"):
        if (cfg.get(key) or 1) > 1:
            found.append(f"{key}: {cfg.get(key)}")
    return found


def check_parallelism(cfg) -> None:
    """Refuse, before any weights load, setups where a rank does not hold the whole model.

    Generation samples a different number of tokens on each rank, with no collective per step, and the references
    copy adapter weights in place: both need every parameter whole on every rank. ZeRO-3 and FSDP shard them (their
    gathers are collectives all ranks must enter in lockstep), tensor and context parallelism split them.

    Raises:
        ValueError: naming each such key and value, and the setups that work.
    """
    found = sharded_parameter_setups(cfg)
    if found:
        raise ValueError(
            f"selfee cannot run with {'; '.join(found)}: these shard the model's weights across ranks, but each rank "
            "generates and judges its share of a round's prompts from the whole model, without per-token "
            f"collectives. Supported: {WORKING_SETUPS}. Remove the setting(s) above, or use a ZeRO-1/ZeRO-2 config."
        )
