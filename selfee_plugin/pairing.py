"""Pairing: which sampled answers may form a pair, and (chosen, rejected) with its preference probability (SPA Eq. 3-4)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .artifacts import EMPTY_RESPONSE, IDENTICAL_RESPONSES


@dataclass
class PairJudgment:
    """Per-prompt outcome of `judge_pairs`; indices are -1 where no pair was made.

    Attributes:
        rewards: (P, n) implicit rewards (per-token means when length-normalised).
        chosen_index, rejected_index: (P,) long.
        margins: (P,) r_w - r_l (0 where unpaired).
        probabilities: (P,) sigmoid(beta * margins) (0.5 where unpaired).
        paired: (P,) bool; a prompt with 2 valid answers or more is unpaired only when every one ties with the best.
    """

    rewards: torch.Tensor
    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    margins: torch.Tensor
    probabilities: torch.Tensor
    paired: torch.Tensor


def valid_responses(responses: list[list[str]]) -> tuple[torch.Tensor, list[str | None]]:
    """Mark answers that may enter a pair: non-empty and the first of identical copies.

    Returns:
        valid: (P, n) bool; reasons: per prompt, `empty_response` / `identical_responses` when fewer than two
        distinct non-empty answers remain, else None.
    """
    if not responses:  # e.g. a chunk whose prompts were all too long
        return torch.zeros(0, 0, dtype=torch.bool), []
    valid, reasons = [], []
    for answers in responses:
        seen, row = set(), []
        for text in answers:
            row.append(bool(text) and text not in seen)
            seen.add(text)
        non_empty = sum(bool(t) for t in answers)
        reasons.append(None if sum(row) >= 2 else EMPTY_RESPONSE if non_empty < 2 else IDENTICAL_RESPONSES)
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
        PairJudgment with per-prompt (P,) choices; prompts with fewer than 2 valid answers are never paired.
    """
    rewards = (policy_logps.double() - ref_logps.double())  # SPA Eq. 3: r(x, y) = log pi_{t-1}(y|x) - log pi_init(y|x)
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
    paired = (valid.sum(1) >= 2) & below.any(1)
    margins = torch.where(paired, best_r[:, 0] - rewards.gather(1, other[:, None])[:, 0], 0.0)
    return PairJudgment(
        rewards=rewards,
        chosen_index=torch.where(paired, best, -1),
        rejected_index=torch.where(paired, other, -1),
        margins=margins,
        probabilities=torch.sigmoid(beta * margins),  # SPA Eq. 4: p(y_w > y_l | x) = sigmoid(beta * margin)
        paired=paired,
    )
