"""Self-annotation of a prompt chunk: generate, judge, persist as JSON Lines (resumable), and measure."""

from __future__ import annotations

import json
import os
import time
import zlib
from collections import Counter

import torch
from tqdm.auto import tqdm

from ._logging import get_logger
from .generation import format_completion, generate_responses, tokenize_completion
from .judge import SKIP_REASONS, judge_pairs, score_sequences, valid_responses

LOG = get_logger(__name__)

# ----------------------------------------------------------------------------------------------- persistence


def _repair_tail(path: str, block: int = 1 << 16) -> None:
    # A crash mid-write leaves a partial last line; appending after it would corrupt the next row.
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


def read_judged_rows(path: str) -> list[dict]:
    """Every complete row of a judged-pairs JSON Lines file (a partial last line from a crash is ignored)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                rows.append(json.loads(line))
    return rows


def load_judged_pairs(path: str, reference: str = "previous", with_metadata: bool = False):
    """Judged pairs as a `datasets.Dataset` that TRL 1.9's DPOTrainer tokenizes like an Axolotl DPO dataset.

    Args:
        path: a judged-pairs JSON Lines file written by `annotate`.
        reference: which judged log-probs become the DPO reference columns: `previous` (log pi_cur, the paper's
            pi_{t-1}) or `initial` (the judge's reference, pi_init), as `selfee.dpo_reference`.
        with_metadata: also return `prompt_id` and `probability`.

    Returns:
        Dataset with `prompt`, `chosen`, `rejected` (formatted strings), `ref_chosen_logps`, `ref_rejected_logps`.
    """
    from datasets import Dataset

    if reference not in ("previous", "initial"):
        raise ValueError(f"reference must be `previous` or `initial` (selfee.dpo_reference), got {reference!r}")
    key = "policy_logps" if reference == "previous" else "ref_logps"
    columns = {k: [] for k in ("prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")}
    if with_metadata:
        columns.update(prompt_id=[], probability=[])
    for row in read_judged_rows(path):
        w, l = row["chosen_index"], row["rejected_index"]
        if w is None:
            continue
        columns["prompt"].append(row["prompt"])
        columns["chosen"].append(row["completions"][w])
        columns["rejected"].append(row["completions"][l])
        columns["ref_chosen_logps"].append(row[key][w])
        columns["ref_rejected_logps"].append(row[key][l])
        if with_metadata:
            columns["prompt_id"].append(row["prompt_id"])
            columns["probability"].append(row["probability"])
    return Dataset.from_dict(columns)


# ----------------------------------------------------------------------------------------------- annotation


def _unjudged(reason: str | None) -> dict:
    keys = ("completions", "policy_logps", "ref_logps", "rewards", "completion_lengths", "chosen_index",
            "rejected_index", "probability", "margin")
    return {"skip_reason": reason, **dict.fromkeys(keys)}


def judge_responses(
    model, tokenizer, prompts, responses, judge_cfg, beta, reference=None, chat_template=None, seed=0, max_length=None
) -> tuple[list[dict], int]:
    """Judge the sampled answers of each prompt (skip reasons, log-probs, rewards, chosen/rejected, probability).

    Args:
        prompts: formatted prompt strings (P,).
        responses: per prompt, n decoded answers.
        judge_cfg: `selfee.judge` (`JudgeConfig`).
        beta: the DPO temperature.
        reference: see `reference_context`.
        seed: seeds `best_random`.

    Returns:
        one partial row per prompt (no id fields), and the number of tokens forwarded.
    """
    valid, reasons = valid_responses(responses)
    live = [i for i, reason in enumerate(reasons) if reason is None]
    rows = [_unjudged(reason) for reason in reasons]
    if not live:
        return rows, 0
    n = len(responses[live[0]])
    completions = [[format_completion(tokenizer, t, chat_template) for t in responses[i]] for i in live]
    sequences = [tokenize_completion(tokenizer, prompts[i], c) for i, cs in zip(live, completions) for c in cs]
    policy, ref, lengths, tokens = score_sequences(
        model, tokenizer, sequences, reference, judge_cfg.batch_size, max_length
    )
    policy, ref, lengths = (x.view(len(live), n) for x in (policy, ref, lengths))  # (P'*n,) -> (P', n)
    judged = judge_pairs(
        policy, ref, beta, valid[live], lengths, judge_cfg.pairing, judge_cfg.length_normalize,
        torch.Generator().manual_seed(seed),
    )
    for k, i in enumerate(live):
        paired = bool(judged.paired[k])
        rows[i].update(
            skip_reason=None if paired else "reward_tie",
            completions=completions[k],
            policy_logps=policy[k].tolist(),
            ref_logps=ref[k].tolist(),
            rewards=judged.rewards[k].tolist(),
            completion_lengths=lengths[k].tolist(),
            chosen_index=int(judged.chosen_index[k]) if paired else None,
            rejected_index=int(judged.rejected_index[k]) if paired else None,
            probability=float(judged.probabilities[k]) if paired else None,
            margin=float(judged.margins[k]) if paired else None,
        )
    return rows, tokens


def _chunk_seed(seed: int, first_id: str) -> int:
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
    chat_template: str | None = None,
    seed: int | None = None,
    max_length: int | None = None,
) -> dict[str, float]:
    """Generate, judge and append one JSON line per prompt to `out_path`, skipping prompt ids already there.

    Works in chunks of `generation.batch_size` prompts; each chunk's rows are flushed and fsynced before the next
    starts, so a crash loses at most the chunk in flight and a rerun with the same arguments completes the file with
    no duplicate and no missing prompt. Every prompt gets a row; unpaired rows carry a `skip_reason`.

    Args:
        model: the current policy pi_cur (plain or PEFT).
        tokenizer: its tokenizer.
        prompts: (prompt_id, chat turns) per prompt; ids must be unique strings.
        selfee_cfg: the `selfee:` block (`SelfeeConfig`).
        beta: the trainer's DPO beta.
        out_path: JSON Lines file, created or appended to.
        reference: pi_ref, see `reference_context`.
        chat_template: Jinja template overriding the tokenizer's.
        seed: sampling seed (default `generation.seed`); the round loop passes seed + t.
        max_length: the DPO `max_length`, so judged log-probs see the same truncation as training.

    Returns:
        metrics: `summarize_judged_rows` over the whole file, plus this call's timings.
    """
    gen_cfg, judge_cfg, n = selfee_cfg.generation, selfee_cfg.judge, selfee_cfg.samples_per_prompt
    seed = gen_cfg.seed if seed is None else seed
    _repair_tail(out_path)
    done = {row["prompt_id"] for row in read_judged_rows(out_path)}
    todo = [(str(pid), messages) for pid, messages in prompts if str(pid) not in done]
    duplicates = [pid for pid, count in Counter(pid for pid, _ in todo).items() if count > 1]
    if duplicates:
        raise ValueError(f"annotate: prompt ids {duplicates[:5]} appear more than once; give every prompt its own id.")
    seconds_gen = seconds_judge = 0.0
    gen_tokens = judge_tokens = 0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc="selfee annotate") as bar:
        for k in range(0, len(todo), gen_cfg.batch_size):
            chunk = todo[k : k + gen_cfg.batch_size]
            chunk_seed = _chunk_seed(seed, chunk[0][0])
            gens = generate_responses(
                model, tokenizer, [m for _, m in chunk], gen_cfg, n, chunk_seed, chat_template, progress=False
            )
            seconds_gen, gen_tokens = seconds_gen + gens.seconds, gen_tokens + gens.generated_tokens
            start = time.perf_counter()
            live = [i for i in range(len(chunk)) if i not in gens.skipped]
            judged, tokens = judge_responses(
                model, tokenizer, [gens.prompts[i] for i in live], [gens.responses[i] for i in live], judge_cfg,
                beta, reference, chat_template, chunk_seed, max_length,
            )
            seconds_judge, judge_tokens = seconds_judge + time.perf_counter() - start, judge_tokens + tokens
            judged_by_index = dict(zip(live, judged))
            for i, (pid, messages) in enumerate(chunk):
                row = {"prompt_id": pid, "messages": messages, "prompt": gens.prompts[i],
                       "responses": gens.responses[i], "finished": gens.finished[i]}
                row.update(judged_by_index.get(i) or _unjudged(gens.skipped.get(i)))
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(chunk))
    metrics = summarize_judged_rows(read_judged_rows(out_path), judge_cfg.length_bias_warning)
    metrics.update({
        "selfee/prompts_resumed": float(len(done)),
        "selfee/seconds_generate": seconds_gen,
        "selfee/seconds_judge": seconds_judge,
        "selfee/generation_tokens_per_second": gen_tokens / seconds_gen if seconds_gen else 0.0,
        "selfee/judge_tokens_per_second": judge_tokens / seconds_judge if seconds_judge else 0.0,
    })
    return metrics


# ----------------------------------------------------------------------------------------------- metrics


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct-n: unique word n-grams over all n-grams, pooled across `texts` (0 when there are none)."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _mean(xs):
    return float(sum(xs) / len(xs)) if xs else 0.0


def summarize_judged_rows(rows: list[dict], length_bias_warning: float | None = None) -> dict[str, float]:
    """Round diagnostics over judged rows: pairs, skips by reason, margins, lengths, length bias, distinct-2."""
    skips = Counter(r.get("skip_reason") for r in rows)
    pairs = [r for r in rows if r.get("chosen_index") is not None]
    margins = torch.tensor([r["margin"] for r in pairs], dtype=torch.float64)
    chosen_len = [r["completion_lengths"][r["chosen_index"]] for r in pairs]
    rejected_len = [r["completion_lengths"][r["rejected_index"]] for r in pairs]
    unequal = [(c, j) for c, j in zip(chosen_len, rejected_len) if c != j]
    longer = _mean([float(c > j) for c, j in unequal])
    answers = [t for r in rows for t in (r.get("responses") or []) if t]
    finished = [x for r in rows for x in (r.get("finished") or [])]
    metrics = {
        "selfee/prompts_judged": float(len(rows)),
        "selfee/pairs": float(len(pairs)),
        **{f"selfee/skipped_{reason}": float(skips[reason]) for reason in SKIP_REASONS},
        "selfee/margin_mean": margins.mean().item() if len(pairs) else 0.0,
        "selfee/margin_std": margins.std().item() if len(pairs) > 1 else 0.0,
        "selfee/preference_probability_mean": _mean([r["probability"] for r in pairs]),
        "selfee/chosen_length_mean": _mean(chosen_len),
        "selfee/rejected_length_mean": _mean(rejected_len),
        "selfee/response_length_mean": _mean([x for r in rows for x in (r.get("completion_lengths") or [])]),
        "selfee/unequal_length_pairs": float(len(unequal)),
        "selfee/longer_chosen_fraction": longer,
        "selfee/truncated_fraction": _mean([float(not x) for x in finished]),
        "selfee/distinct_2": distinct_n(answers, 2),
    }
    if length_bias_warning is not None and unequal and longer > length_bias_warning:
        LOG.warning(
            f"selfee judge chose the longer response in {longer:.0%} of {len(unequal)} unequal-length pairs "
            f"(judge.length_bias_warning={length_bias_warning}). The summed implicit reward favours longer answers "
            "once DPO has lowered the end-of-answer probability; this is its main failure mode and can make answers "
            "grow each round while quality falls. Check judge accuracy on human pairs (judge.eval_pairs) and "
            "selfee/response_length_mean across rounds."
        )
    return metrics
