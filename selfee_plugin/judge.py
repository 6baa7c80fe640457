"""Direct preference judgment (SPA section 3.2): implicit reward r = log pi_cur - log pi_ref of sampled answers,
judged rows for the round's pairs file, and judge accuracy on human-labelled pairs."""

from __future__ import annotations

import math

import torch

from ._logging import get_logger
from .artifacts import REWARD_TIE
from .formatting import format_completion, format_preference_rows, tokenize_completion
from .logprobs import Scorer
from .pairing import judge_pairs, valid_responses
from .references import reference_context

LOG = get_logger(__name__)

JUDGED_FIELDS = ("completions", "policy_logps", "ref_logps", "rewards", "completion_lengths", "chosen_index",
                 "rejected_index", "probability", "margin")


def score_sequences(model, sequences, scorer: Scorer, reference=None):
    """Summed log-probs of each sequence under the policy and under the reference (see `reference_context`).

    Args:
        sequences: (prompt_ids, completion_ids) per response, as `tokenize_completion` returns them.
        scorer: how log-probs are computed (`logprobs.Scorer`).

    Returns:
        policy_logps: (N,); ref_logps: (N,); lengths: (N,) completion tokens; tokens scored (both models, each
        answer counted with its prompt, as a full forward would process them).
    """
    policy, lengths = scorer(model, sequences)
    with reference_context(model, reference) as ref_model:
        ref, _ = scorer(ref_model, sequences)
    tokens = 2 * sum(min(len(p) + len(c), scorer.max_length or math.inf) for p, c in sequences)
    return policy, ref, lengths, tokens


def unjudged_row(reason: str | None) -> dict:
    """The judged fields of a prompt that produced no pair."""
    return {"skip_reason": reason, **dict.fromkeys(JUDGED_FIELDS)}


def judge_responses(model, tokenizer, prompts, responses, judge_cfg, beta, scorer: Scorer, reference=None,
                    seed=0) -> tuple[list[dict], int]:
    """Judge the sampled answers of each prompt (skip reasons, log-probs, rewards, chosen/rejected, probability).

    Args:
        prompts: formatted prompt strings (P,).
        responses: per prompt, n decoded answers.
        judge_cfg: `selfee.judge` (`JudgeConfig`).
        beta: the DPO temperature.
        scorer: how log-probs are computed (`logprobs.Scorer`).
        reference: see `reference_context`.
        seed: seeds `best_random`.

    Returns:
        one partial row per prompt (the fields in JUDGED_FIELDS and `skip_reason`), and the tokens forwarded.
    """
    valid, reasons = valid_responses(responses)
    live = [i for i, reason in enumerate(reasons) if reason is None]
    rows = [unjudged_row(reason) for reason in reasons]
    if not live:
        return rows, 0
    n = len(responses[live[0]])
    completions = [[format_completion(tokenizer, t) for t in responses[i]] for i in live]
    sequences = [tokenize_completion(tokenizer, prompts[i], c) for i, cs in zip(live, completions) for c in cs]
    policy, ref, lengths, tokens = score_sequences(model, sequences, scorer, reference)
    policy, ref, lengths = (x.view(len(live), n) for x in (policy, ref, lengths))  # (P'*n,) -> (P', n)
    judged = judge_pairs(
        policy, ref, beta, valid[live], lengths, judge_cfg.pairing, judge_cfg.length_normalize,
        torch.Generator().manual_seed(seed),
    )
    for k, i in enumerate(live):
        paired = bool(judged.paired[k])
        rows[i].update(
            skip_reason=None if paired else REWARD_TIE,
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


def rescore_rows(model, tokenizer, rows: list[dict], scorer: Scorer) -> list[list[float] | None]:
    """log-probs of each judged row's completions under `model` as it is now (e.g. pi_t after the round's training).

    Returns:
        per row, one summed log-prob per completion; None for rows with no completions (skipped prompts).
    """
    live = [i for i, row in enumerate(rows) if row.get("completions")]
    sequences = [tokenize_completion(tokenizer, rows[i]["prompt"], c) for i in live for c in rows[i]["completions"]]
    logps, _ = scorer(model, sequences)
    out, position = [None] * len(rows), 0
    for i in live:
        count = len(rows[i]["completions"])
        out[i] = logps[position : position + count].tolist()
        position += count
    return out


# ----------------------------------------------------------------------------------------------- judge accuracy


def load_eval_pairs(entry: dict, tokenizer) -> list[dict]:
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
        rows = format_preference_rows(rows, tokenizer, entry["type"], entry)
    for i, row in enumerate(rows):
        if not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise ValueError(
                f"selfee.judge.eval_pairs row {i} has no prompt/chosen/rejected strings (keys: {sorted(row)}); "
                "give the entry an Axolotl DPO `type:` such as chat_template.default."
            )
    return rows


def judge_accuracy(model, tokenizer, rows: list[dict], scorer: Scorer, reference=None,
                   length_normalize: bool = False) -> float:
    """Share of human-labelled pairs whose chosen answer gets the strictly higher implicit reward (TRL's accuracy).

    Args:
        rows: dicts with formatted `prompt`, `chosen`, `rejected` strings (see `load_eval_pairs`).
        scorer: how log-probs are computed (`logprobs.Scorer`).
        reference: pi_ref, see `reference_context`.

    Returns:
        accuracy in [0, 1]; ties count as wrong, as in TRL's `rewards/accuracies`; 0.0 for no rows.
    """
    if not rows:
        return 0.0
    sequences = [tokenize_completion(tokenizer, r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")]
    policy, ref, lengths, _ = score_sequences(model, sequences, scorer, reference)
    rewards = policy.double() - ref.double()
    if length_normalize:
        rewards = rewards / lengths.clamp(min=1)
    chosen, rejected = rewards.view(-1, 2).unbind(1)  # (2R,) -> (R,), (R,)
    return (chosen > rejected).float().mean().item()
