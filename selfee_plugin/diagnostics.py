"""Round diagnostics from judged rows: pairs, skips by reason, margins, lengths, length bias, truncation, diversity."""

from __future__ import annotations

from collections import Counter

import torch

from . import metric_keys as keys
from ._logging import get_logger
from .artifacts import SKIP_REASONS

LOG = get_logger(__name__)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct-n: unique word n-grams over all n-grams, pooled across `texts` (0 when there are none)."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _mean(xs):
    return float(sum(xs) / len(xs)) if xs else 0.0


def summarize_judged_rows(rows: list[dict], length_bias_warning: float | None = None) -> dict[str, float]:
    """Round diagnostics over judged rows (length bias is watched first: the summed implicit reward's main failure mode)."""
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
        keys.PROMPTS_JUDGED: float(len(rows)),
        keys.PAIRS: float(len(pairs)),
        **{keys.skipped(reason): float(skips[reason]) for reason in SKIP_REASONS},
        keys.MARGIN_MEAN: margins.mean().item() if len(pairs) else 0.0,
        keys.MARGIN_STD: margins.std().item() if len(pairs) > 1 else 0.0,
        keys.PREFERENCE_PROBABILITY_MEAN: _mean([r["probability"] for r in pairs]),
        keys.CHOSEN_LENGTH_MEAN: _mean(chosen_len),
        keys.REJECTED_LENGTH_MEAN: _mean(rejected_len),
        keys.RESPONSE_LENGTH_MEAN: _mean([x for r in rows for x in (r.get("completion_lengths") or [])]),
        keys.UNEQUAL_LENGTH_PAIRS: float(len(unequal)),
        keys.LONGER_CHOSEN_FRACTION: longer,
        keys.TRUNCATED_FRACTION: _mean([float(not x) for x in finished]),
        keys.DISTINCT_2: distinct_n(answers, 2),
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


def post_round_signals(rows: list[dict], after: list[list[float] | None]) -> dict[str, float]:
    """Signals that need no gold, from the round's own samples re-scored by the policy after the round (pi_t).

    Args:
        rows: the round's judged rows (`pairs.jsonl`), with `policy_logps` = log pi_{t-1} and `ref_logps` = log pi_init.
        after: per row, log pi_t of each of its `completions` (None where the row has none).

    Returns:
        `selfee/logps_drift_chosen` / `_rejected`: mean change of log pi on the chosen / rejected answers during the
            round (a learning rate too high showed as chosen log-probs falling ~3x in one round); `..._per_token`:
            the same summed over the pairs and divided by their tokens (comparable across answer lengths);
        `selfee/logps_drift_ratio`: how many times as far the rejected answers' per-token log-probs fell as the
            chosen answers' rose (present only when they did both: a margin won by pushing down, not pulling up);
        `selfee/kl_previous`: KL(pi_{t-1} || pi_t) estimated on the round's samples (drawn from pi_{t-1}), in nats
            per response;
        `selfee/judge_agreement_after`: share of the round's pairs whose chosen answer still has the strictly higher
            implicit reward under pi_t (r = log pi_t - log pi_init);
        `selfee/reward_after_mean`: mean log pi_t - log pi_init over the round's samples.
    """
    drift_w, drift_l, kl, agree, rewards, tokens_w, tokens_l = [], [], [], [], [], [], []
    for row, logps in zip(rows, after):
        if logps is None or row.get("policy_logps") is None:
            continue
        before, init = row["policy_logps"], row["ref_logps"]
        kl += [b - a for a, b in zip(logps, before)]
        rewards += [a - i for a, i in zip(logps, init)]
        w, l = row.get("chosen_index"), row.get("rejected_index")
        if w is not None:
            drift_w.append(logps[w] - before[w])
            drift_l.append(logps[l] - before[l])
            tokens_w.append(row["completion_lengths"][w])
            tokens_l.append(row["completion_lengths"][l])
            agree.append(float(logps[w] - init[w] > logps[l] - init[l]))
    per_token_w = sum(drift_w) / max(sum(tokens_w), 1)
    per_token_l = sum(drift_l) / max(sum(tokens_l), 1)
    return {
        keys.DRIFT_CHOSEN: _mean(drift_w),
        keys.DRIFT_REJECTED: _mean(drift_l),
        keys.DRIFT_CHOSEN_PER_TOKEN: per_token_w,
        keys.DRIFT_REJECTED_PER_TOKEN: per_token_l,
        keys.KL_PREVIOUS: _mean(kl),
        keys.JUDGE_AGREEMENT_AFTER: _mean(agree),
        keys.REWARD_AFTER_MEAN: _mean(rewards),
        **({keys.DRIFT_RATIO: -per_token_l / per_token_w} if per_token_w > 0 > per_token_l else {}),
    }
