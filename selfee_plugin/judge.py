"""Direct preference judgment: implicit reward r = log pi_cur - log pi_ref -> judged pairs, persisted and measured."""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from axolotl.utils.logging import get_logger
from tqdm.auto import tqdm
from trl.trainer.utils import pad, selective_log_softmax, use_adapter

from .generation import eval_mode, format_completion, generate_responses, tokenize_completion

LOG = get_logger(__name__)

SKIP_REASONS = ("prompt_too_long", "empty_response", "identical_responses", "reward_tie")


# ----------------------------------------------------------------------------------------------- log-probs


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


@contextmanager
def reference_context(model, reference):
    """Yield the module whose forward gives pi_ref, without copying any base weight.

    Args:
        model: the policy (a PEFT model unless `reference` is a module).
        reference: None (the PEFT model with adapters disabled), a PEFT adapter name (activated for the duration,
            as TRL 1.9 does with its `ref` adapter), or a separate frozen `nn.Module`.
    """
    if isinstance(reference, torch.nn.Module):
        yield reference
        return
    if not _is_peft(model):
        raise ValueError(
            f"reference={reference!r} needs a PEFT model (adapters to disable or switch); for full fine-tuning "
            "pass the frozen reference model itself."
        )
    # PEFT's set_adapter makes the activated adapter trainable; restore every flag the caller had.
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with use_adapter(model, reference):
            yield model
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)


@torch.no_grad()
def completion_logps(
    model,
    sequences: list[tuple[list[int], list[int]]],
    batch_size: int,
    pad_token_id: int,
    padding_side: str = "right",
    max_length: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs, computed as TRL 1.9's DPO loss computes them (prompt tokens excluded).

    Args:
        model: any causal LM; called in its current adapter state.
        sequences: (prompt_ids, completion_ids) per response, as `tokenize_completion` returns them.
        batch_size: sequences per forward pass (sorted by length first).
        pad_token_id: padding id.
        padding_side: "right" (TRL's collator) or "left"; results agree up to float error.
        max_length: truncate prompt+completion to this many tokens (keep_start), as the DPO collator does.

    Returns:
        logps: (N,) float32 summed log-probs; lengths: (N,) completion tokens scored.
    """
    device = next(model.parameters()).device
    logps, lengths = torch.zeros(len(sequences)), torch.zeros(len(sequences), dtype=torch.long)
    order = sorted(range(len(sequences)), key=lambda i: -sum(map(len, sequences[i])))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    with eval_mode(model):
        for batch in tqdm(batches, desc="selfee judge", disable=not progress):
            ids = [sequences[i][0] + sequences[i][1] for i in batch]
            masks = [[0] * len(sequences[i][0]) + [1] * len(sequences[i][1]) for i in batch]
            if max_length is not None:
                ids, masks = [x[:max_length] for x in ids], [m[:max_length] for m in masks]
            input_ids = pad([torch.tensor(x) for x in ids], pad_token_id, padding_side).to(device)
            attention_mask = pad([torch.ones(len(x), dtype=torch.long) for x in ids], 0, padding_side).to(device)
            completion_mask = pad([torch.tensor(m) for m in masks], 0, padding_side).to(device)
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
            if padding_side == "left":
                # Default positions count from the padded start; absolute-position models need them from each text.
                kwargs["position_ids"] = (attention_mask.cumsum(1) - 1).clamp(min=0)
            logits = model(**kwargs).logits[:, :-1]  # (B, L-1, V): position t predicts token t+1
            per_token = selective_log_softmax(logits, input_ids[:, 1:])
            scored = completion_mask[:, 1:].bool()
            logps[batch] = torch.where(scored, per_token, 0.0).sum(1).float().cpu()
            lengths[batch] = scored.sum(1).cpu()
    return logps, lengths


# ----------------------------------------------------------------------------------------------- pure math


@dataclass
class PairJudgment:
    """Per-prompt outcome of `judge_pairs`; indices are -1 where no pair was made.

    Attributes:
        rewards: (P, n) implicit rewards (per-token means when length-normalised).
        chosen_index, rejected_index: (P,) long.
        margins: (P,) r_w - r_l (0 where unpaired).
        probabilities: (P,) sigmoid(beta * margins) (0.5 where unpaired).
        paired: (P,) bool; tied: (P,) bool, at least 2 valid answers but none strictly below the best.
    """

    rewards: torch.Tensor
    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    margins: torch.Tensor
    probabilities: torch.Tensor
    paired: torch.Tensor
    tied: torch.Tensor


def valid_responses(responses: list[list[str]]) -> tuple[torch.Tensor, list[str | None]]:
    """Mark answers that may enter a pair: non-empty and the first of identical copies.

    Returns:
        valid: (P, n) bool; reasons: per prompt, `empty_response` / `identical_responses` when fewer than two
        distinct non-empty answers remain, else None.
    """
    valid, reasons = [], []
    for answers in responses:
        seen, row = set(), []
        for text in answers:
            row.append(bool(text) and text not in seen)
            seen.add(text)
        non_empty = sum(bool(t) for t in answers)
        reasons.append(None if sum(row) >= 2 else "empty_response" if non_empty < 2 else "identical_responses")
        valid.append(row)
    return torch.tensor(valid, dtype=torch.bool).reshape(len(responses), -1), reasons


def judge_pairs(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
    valid: torch.Tensor | None = None,
    completion_lengths: torch.Tensor | None = None,
    pairing: str = "best_worst",
    length_normalize: bool = False,
    generator: torch.Generator | None = None,
) -> PairJudgment:
    """Pick (chosen, rejected) per prompt from the implicit reward and give the judged preference probability.

    Args:
        policy_logps: (P, n) summed log pi_cur(y|x).
        ref_logps: (P, n) summed log pi_ref(y|x).
        beta: the DPO temperature the trainer uses.
        valid: (P, n) bool, answers allowed in a pair (default all).
        completion_lengths: (P, n) completion tokens; required with `length_normalize`.
        pairing: `best_worst` or `best_random` (a uniformly drawn answer strictly below the best); same for n=2.
        length_normalize: divide each reward by its completion length.
        generator: RNG for `best_random`.
    """
    rewards = (policy_logps - ref_logps).double()  # SPA Eq. 3: r(x, y) = log pi_{t-1}(y|x) - log pi_init(y|x)
    if length_normalize:
        rewards = rewards / completion_lengths.clamp(min=1)
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    best = rewards.masked_fill(~valid, -math.inf).argmax(1)
    best_r = rewards.gather(1, best[:, None])  # (P, 1)
    below = valid & (rewards < best_r)  # exact ties with the best never form a pair
    if pairing == "best_worst":
        other = rewards.masked_fill(~below, math.inf).argmin(1)
    elif pairing == "best_random":
        other = torch.rand(rewards.shape, generator=generator, dtype=torch.float64).masked_fill(~below, -1).argmax(1)
    else:
        raise ValueError(f"selfee.judge.pairing must be best_worst or best_random, got {pairing!r}")
    enough = valid.sum(1) >= 2
    paired = enough & below.any(1)
    margins = torch.where(paired, best_r[:, 0] - rewards.gather(1, other[:, None])[:, 0], 0.0)
    return PairJudgment(
        rewards=rewards,
        chosen_index=torch.where(paired, best, -1),
        rejected_index=torch.where(paired, other, -1),
        margins=margins,
        probabilities=torch.sigmoid(beta * margins),  # SPA Eq. 4: p(y_w > y_l | x) = sigmoid(beta * margin)
        paired=paired,
        tied=enough & ~paired,
    )


# ----------------------------------------------------------------------------------------------- persistence


def _repair_tail(path: str) -> None:
    # A crash mid-write leaves a partial last line; appending after it would corrupt the next row.
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


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


def load_judged_pairs(path: str, with_metadata: bool = False):
    """Judged pairs as a `datasets.Dataset` that TRL 1.9's DPOTrainer tokenizes like an Axolotl DPO dataset.

    Columns: `prompt`, `chosen`, `rejected` (formatted strings), `ref_chosen_logps`/`ref_rejected_logps` (the judged
    log pi_cur, i.e. the reference of this round's DPO); with `with_metadata`, also `prompt_id` and `probability`.
    """
    from datasets import Dataset

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
        columns["ref_chosen_logps"].append(row["policy_logps"][w])
        columns["ref_rejected_logps"].append(row["policy_logps"][l])
        if with_metadata:
            columns["prompt_id"].append(row["prompt_id"])
            columns["probability"].append(row["probability"])
    return Dataset.from_dict(columns)


# ----------------------------------------------------------------------------------------------- annotation


def _score(model, tokenizer, sequences, reference, batch_size, max_length):
    """(policy_logps, ref_logps, lengths, tokens forwarded) for flat (prompt_ids, completion_ids) sequences."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy, lengths = completion_logps(model, sequences, batch_size, pad_id, max_length=max_length)
    with reference_context(model, reference) as ref_model:
        ref, _ = completion_logps(ref_model, sequences, batch_size, pad_id, max_length=max_length)
    tokens = 2 * sum(min(len(p) + len(c), max_length or math.inf) for p, c in sequences)
    return policy, ref, lengths, tokens


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
    policy, ref, lengths, tokens = _score(model, tokenizer, sequences, reference, judge_cfg.batch_size, max_length)
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
    if len({pid for pid, _ in todo}) != len(todo):
        raise ValueError("annotate: prompt ids must be unique within a call")
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
        **{f"selfee/skipped_{reason}": float(sum(r.get("skip_reason") == reason for r in rows)) for reason in SKIP_REASONS},
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


# ----------------------------------------------------------------------------------------------- judge accuracy


def rows_from_messages(rows: list[dict], tokenizer, chat_template: str | None = None, ds_cfg: dict | None = None):
    """Format rows in Axolotl `chat_template.default` shape (messages/chosen/rejected) with Axolotl's own strategy."""
    from axolotl.prompt_strategies.dpo.chat_template import default

    cfg = {"datasets": [dict(ds_cfg or {})]}
    if chat_template is not None:
        cfg.update(chat_template="jinja", chat_template_jinja=chat_template)
    transform, _ = default(cfg)
    return [transform(row, tokenizer=tokenizer) for row in rows]


def judge_accuracy(
    model, tokenizer, rows: list[dict], reference=None, batch_size: int = 16, length_normalize: bool = False,
    max_length: int | None = None,
) -> float:
    """Share of human-labelled pairs whose chosen answer gets the strictly higher implicit reward (TRL's accuracy).

    Args:
        rows: dicts with formatted `prompt`, `chosen`, `rejected` strings (Axolotl DPO output; see
            `rows_from_messages` for the chat_template.default shape).
        reference: pi_ref, see `reference_context`. The ordering does not depend on beta, so none is taken.
    """
    if not rows:
        return 0.0
    sequences = [tokenize_completion(tokenizer, r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")]
    policy, ref, lengths, _ = _score(model, tokenizer, sequences, reference, batch_size, max_length)
    rewards = policy - ref
    if length_normalize:
        rewards = rewards / lengths.clamp(min=1)
    chosen, rejected = rewards.view(-1, 2).unbind(1)  # (2R,) -> (R,), (R,)
    return (chosen > rejected).float().mean().item()
