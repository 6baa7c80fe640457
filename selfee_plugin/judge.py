"""Direct preference judgment: implicit reward r = log pi_cur - log pi_ref -> pairs and probabilities."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from tqdm.auto import tqdm
from trl.trainer.utils import pad, selective_log_softmax, use_adapter

from ._logging import get_logger
from .generation import (
    eval_mode,
    format_preference_rows,
    tokenize_completion,
)

LOG = get_logger(__name__)

# Why a prompt produced no pair; each is counted in the metrics as `selfee/skipped_<reason>`.
SKIP_REASONS = ("prompt_too_long", "empty_response", "identical_responses", "reward_tie")


# ----------------------------------------------------------------------------------------------- log-probs


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
    if not is_peft_model(model):
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
            # Logits are needed only from the position before the batch's earliest completion token: prompts are
            # most of a sequence, so this saves most of the (B, L, V) logits TRL would materialise.
            start = max(int(completion_mask.argmax(1).min()) - 1, 0)
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
            kwargs["logits_to_keep"] = input_ids.shape[1] - start
            if padding_side == "left":
                # Default positions count from the padded start; absolute-position models need them from each text.
                kwargs["position_ids"] = (attention_mask.cumsum(1) - 1).clamp(min=0)
            logits = model(**kwargs).logits[:, :-1]  # (B, L-1-start, V): position t predicts token t+1
            per_token = selective_log_softmax(logits, input_ids[:, start + 1 :])
            scored = completion_mask[:, start + 1 :].bool()
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

    Returns:
        PairJudgment with per-prompt (P,) choices; prompts with fewer than 2 valid answers are neither paired nor tied.
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


def score_sequences(model, tokenizer, sequences, reference=None, batch_size=16, max_length=None):
    """One forward per sequence under the policy and one under the reference (see `reference_context`).

    Args:
        sequences: (prompt_ids, completion_ids) per response, as `tokenize_completion` returns them.

    Returns:
        policy_logps: (N,); ref_logps: (N,); lengths: (N,) completion tokens; tokens forwarded (both models).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy, lengths = completion_logps(model, sequences, batch_size, pad_id, max_length=max_length)
    with reference_context(model, reference) as ref_model:
        ref, _ = completion_logps(ref_model, sequences, batch_size, pad_id, max_length=max_length)
    tokens = 2 * sum(min(len(p) + len(c), max_length or math.inf) for p, c in sequences)
    return policy, ref, lengths, tokens


# ----------------------------------------------------------------------------------------------- judge accuracy


def load_eval_pairs(entry: dict, tokenizer, chat_template: str | None = None) -> list[dict]:
    """Held-out human-labelled pairs (`selfee.judge.eval_pairs`, an Axolotl DPO dataset entry) as formatted rows.

    The entry is loaded with Axolotl's dataset loader; with a `type:` its rows go through that Axolotl DPO strategy,
    without one they must already hold formatted `prompt`/`chosen`/`rejected` strings.

    Raises:
        ValueError: no `path`, an unknown type, or a row without the three strings (named by its index).
    """
    from axolotl.utils.data.shared import load_dataset_with_config
    from axolotl.utils.dict import DictDefault

    if not entry.get("path"):
        raise ValueError(f"selfee.judge.eval_pairs needs a `path` (got {entry!r}), e.g. {{path: pairs.jsonl, type: "
                         "chat_template.default}.")
    dataset = load_dataset_with_config(DictDefault({"split": "train", **entry}), use_auth_token=False)
    rows = list(dataset)
    if entry.get("type"):
        rows = format_preference_rows(rows, tokenizer, entry["type"], entry, chat_template)
    for i, row in enumerate(rows):
        if not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise ValueError(
                f"selfee.judge.eval_pairs row {i} has no prompt/chosen/rejected strings (keys: {sorted(row)}); "
                "give the entry an Axolotl DPO `type:` such as chat_template.default."
            )
    return rows


def judge_accuracy(
    model, tokenizer, rows: list[dict], reference=None, beta: float | None = None, batch_size: int = 16,
    length_normalize: bool = False, max_length: int | None = None,
) -> float:
    """Share of human-labelled pairs whose chosen answer gets the strictly higher implicit reward (TRL's accuracy).

    Args:
        rows: dicts with formatted `prompt`, `chosen`, `rejected` strings (see `load_eval_pairs`).
        reference: pi_ref, see `reference_context`.
        beta: accepted for symmetry with the judge; for beta > 0 it cannot change the ordering, so it is unused.

    Returns:
        accuracy in [0, 1]; ties count as wrong, as in TRL's `rewards/accuracies`; 0.0 for no rows.
    """
    if not rows:
        return 0.0
    sequences = [tokenize_completion(tokenizer, r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")]
    policy, ref, lengths, _ = score_sequences(model, tokenizer, sequences, reference, batch_size, max_length)
    rewards = policy - ref
    if length_normalize:
        rewards = rewards / lengths.clamp(min=1)
    chosen, rejected = rewards.view(-1, 2).unbind(1)  # (2R,) -> (R,), (R,)
    return (chosen > rejected).float().mean().item()
