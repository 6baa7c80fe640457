"""Self-annotation of a round's prompts: generate, judge, persist as JSON Lines in resumable chunks, and measure."""

from __future__ import annotations

import os
import time
import zlib
from collections import Counter

from tqdm.auto import tqdm

from ._logging import get_logger
from .artifacts import append_rows, read_judged_rows, repair_tail
from .diagnostics import summarize_judged_rows
from .generation import make_sampler
from .judge import judge_responses, unjudged_row

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
                beta, reference, seed_k, max_length,
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
        "selfee/prompts_resumed": float(len(done)),
        "selfee/seconds_generate": seconds_gen,
        "selfee/seconds_judge": seconds_judge,
        "selfee/generation_tokens_per_second": gen_tokens / seconds_gen if seconds_gen else 0.0,
        "selfee/judge_tokens_per_second": judge_tokens / seconds_judge if seconds_judge else 0.0,
        "selfee/generation_batch_prompts": float(batch_prompts),
    })
    return metrics
