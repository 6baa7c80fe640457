"""Self-annotation of a round's prompts: generate, judge, persist as JSON Lines in resumable chunks, shard over
processes, and measure."""

from __future__ import annotations

import os
import time
import zlib
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from . import distributed
from . import metric_keys as keys
from ._logging import get_logger
from .artifacts import append_rows, merge_pairs_parts, pairs_part_path, read_judged_rows, read_round_rows, repair_tail
from .diagnostics import summarize_judged_rows
from .generation import make_sampler
from .judge import judge_responses, unjudged_row
from .logprobs import Scorer

LOG = get_logger(__name__)


def chunk_seed(seed: int, first_id: str) -> int:
    # Seeded by the chunk's first prompt id, not its position: a resumed run re-forms the same chunks after the
    # last written one, so it samples exactly what the uninterrupted run would have.
    return (seed * 1_000_003 + zlib.crc32(first_id.encode())) % 2**31


def annotate(
    model,
    tokenizer,
    prompts: list[tuple[str, list[dict]]],
    selfee_cfg,
    beta: float,
    out_path: str,
    reference=None,
    seed: int | None = None,
    max_length: int | None = None,
    summarize: bool = True,
) -> dict[str, float]:
    """Generate, judge and append one JSON line per prompt to `out_path`, skipping prompt ids already there.

    Works in chunks of `generation.chunk_size` prompts; each chunk's rows are flushed and fsynced before the next
    starts, so a crash loses at most the chunk in flight and a rerun with the same arguments completes the file with
    no duplicate and no missing prompt. Every prompt gets a row; unpaired rows carry a `skip_reason`.

    Args:
        model: the current policy pi_cur (plain or PEFT).
        tokenizer: its tokenizer.
        prompts: (prompt_id, chat turns) per prompt; ids must be unique strings.
        selfee_cfg: the `selfee:` block (`SelfeeConfig`).
        beta: the trainer's DPO beta.
        out_path: JSON Lines file, created or appended to.
        reference: pi_ref, see `references.reference_context`.
        seed: sampling seed (default `generation.seed`); the round loop passes seed + t.
        max_length: the DPO `max_length`, so judged log-probs see the same truncation as training.
        summarize: add `summarize_judged_rows` over the whole file; False when `out_path` holds one rank's share
            of the round (the round loop summarizes the merged file).

    Returns:
        metrics: `summarize_judged_rows` over the whole file (with `summarize`), plus this call's timings.
    """
    gen_cfg, judge_cfg, n = selfee_cfg.generation, selfee_cfg.judge, selfee_cfg.samples_per_prompt
    seed = gen_cfg.seed if seed is None else seed
    repair_tail(out_path)
    done = {row["prompt_id"] for row in read_judged_rows(out_path)}
    todo = [(str(pid), messages) for pid, messages in prompts if str(pid) not in done]
    duplicates = [pid for pid, count in Counter(pid for pid, _ in todo).items() if count > 1]
    if duplicates:
        raise ValueError(f"annotate: prompt ids {duplicates[:5]} appear more than once; give every prompt its own id.")
    if done:
        LOG.info(f"selfee: resuming {out_path}: {len(done)} prompt(s) already judged, {len(todo)} to go")
    sampler = make_sampler(model, tokenizer, gen_cfg)
    scorer = Scorer.for_run(tokenizer, judge_cfg, max_length)
    seconds_gen = seconds_judge = 0.0
    gen_tokens = judge_tokens = 0
    batch_prompts = 0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc="selfee annotate") as bar:
        for k in range(0, len(todo), gen_cfg.chunk_size):
            chunk = todo[k : k + gen_cfg.chunk_size]
            seed_k = chunk_seed(seed, chunk[0][0])
            gens = sampler.generate([m for _, m in chunk], n, seed_k)
            seconds_gen, gen_tokens = seconds_gen + gens.seconds, gen_tokens + gens.generated_tokens
            batch_prompts = gens.batch_prompts or batch_prompts
            start = time.perf_counter()
            live = [i for i in range(len(chunk)) if i not in gens.skipped]
            judged, tokens = judge_responses(
                model, tokenizer, [gens.prompts[i] for i in live], [gens.responses[i] for i in live], judge_cfg,
                beta, scorer, reference, seed_k,
            )
            seconds_judge, judge_tokens = seconds_judge + time.perf_counter() - start, judge_tokens + tokens
            judged_by_index = dict(zip(live, judged))
            rows = []
            for i, (pid, messages) in enumerate(chunk):
                row = {"prompt_id": pid, "messages": messages, "prompt": gens.prompts[i],
                       "responses": gens.responses[i], "finished": gens.finished[i]}
                row.update(judged_by_index.get(i) or unjudged_row(gens.skipped.get(i)))
                rows.append(row)
            append_rows(f, rows)
            bar.update(len(chunk))
    metrics = summarize_judged_rows(read_judged_rows(out_path), judge_cfg.length_bias_warning) if summarize else {}
    metrics.update({
        keys.PROMPTS_RESUMED: float(len(done)),
        keys.SECONDS_GENERATE: seconds_gen,
        keys.SECONDS_JUDGE: seconds_judge,
        keys.GENERATION_TOKENS_PER_SECOND: gen_tokens / seconds_gen if seconds_gen else 0.0,
        keys.JUDGE_TOKENS_PER_SECOND: judge_tokens / seconds_judge if seconds_judge else 0.0,
        keys.GENERATION_BATCH_PROMPTS: float(batch_prompts),
    })
    return metrics


def annotate_round(model, tokenizer, round_idx: int, prompts, selfee_cfg, beta: float, pairs_path: Path,
                   reference=None, max_length: int | None = None) -> tuple[dict, list[dict]]:
    """`annotate` round t's prompts not judged yet (sampling seed `generation.seed + t`), sharded over the processes;
    rank 0 merges the rows.

    Rank 0 reads which prompts every file of the round already holds (written by any earlier run, with any number
    of processes) and broadcasts their ids, so all ranks deal the same remaining list; rank r takes every world-th
    prompt of it (`distributed.shard`). A prompt is judged once, by one rank, whatever the world size.

    Returns:
        metrics: `summarize_judged_rows` over the merged file, the ranks' timings and `PROMPTS_ANNOTATED` reduced
            (`distributed.REDUCTIONS`), `PROMPTS_RESUMED` and `WORLD_SIZE`;
        rows: the merged file's judged rows. Both the same on every rank.
    """
    world, rank = distributed.world_size(), distributed.rank()
    order = [str(pid) for pid, _ in prompts]
    done = distributed.broadcast(
        {row["prompt_id"] for row in read_round_rows(pairs_path)} & set(order) if distributed.is_main() else None
    )
    todo = [(str(pid), messages) for pid, messages in prompts if str(pid) not in done]
    if done:
        LOG.info(f"selfee round {round_idx}: resuming: {len(done)} prompt(s) already judged, {len(todo)} to go")
    if world > 1:
        LOG.info(f"selfee round {round_idx}: {len(todo)} prompt(s) sharded over {world} processes")
    mine = distributed.shard(todo, rank, world)
    out_path = pairs_path if world == 1 else pairs_part_path(pairs_path, rank)
    local = annotate(model, tokenizer, mine, selfee_cfg, beta, str(out_path), reference,
                     selfee_cfg.generation.seed + round_idx, max_length, summarize=False)
    local[keys.PROMPTS_ANNOTATED] = float(len(mine))
    per_rank = distributed.gather(local)  # returns once every rank has written its rows
    if distributed.is_main():
        merge_pairs_parts(pairs_path, order)  # also folds in part files left by an interrupted run
    distributed.barrier()
    rows = read_judged_rows(pairs_path)
    metrics = summarize_judged_rows(rows, selfee_cfg.judge.length_bias_warning)
    metrics.update(distributed.reduce_metrics(per_rank))
    metrics[keys.PROMPTS_RESUMED] = float(len(done))
    metrics[keys.WORLD_SIZE] = float(world)
    return metrics, rows
