"""The round guard: after a round's training, undo it when gold-free signals show harm, retry once, or stop.

The rule (`selfee.guard`; the evidence behind each threshold is in `benchmarks/README.md`, "Round guard"): a round is
harmful when
    - the policy's log-probs on the round's own chosen answers fell during the round (per token, below
      `min_chosen_drift`): DPO pushing every answer down, likelihood displacement;
    - or they rose, but the rejected answers' log-probs fell more than `max_drift_ratio` times as far (per token): the
      margin won by pushing answers down rather than pulling the chosen ones up, the step before displacement;
    - answers sampled after the round grew by more than `max_length_growth` while the judge had chosen the longer
      answer in most (of >= MIN_UNEQUAL_PAIRS) unequal-length pairs: the summed reward's length bias feeding itself;
    - the judge agreed with `selfee.labels` on fewer than `min_on_policy_accuracy` of this round's labelled pairs.
A fired round is restored to pi_{t-1} (the rejected policy is kept under `round_<t>/rejected/attempt_<k>/`) and
retried once on the same judged pairs at `lr_scale` x the learning rate, with length-balanced pairs too when the
judge leaned to longer answers. If the retry fires too, the loop stops; the final model is the last good round's.

Round 0 (seed DPO) is not guarded: judged offline by these rules, seed rounds at a high rate that raised gold would
have fired, so the drift rules are evidence about self-annotation rounds, not a law of DPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import distributed
from . import metric_keys as keys
from ._logging import get_logger
from .artifacts import METRICS_FILE, policy_in, rejected_dir, write_json

LOG = get_logger(__name__)

# Fewer unequal-length pairs than this say nothing about a length bias.
MIN_UNEQUAL_PAIRS = 10


@dataclass(frozen=True)
class Attempt:
    number: int
    lr_scale: float = 1.0
    length_balanced: bool = False

    def describe(self) -> str:
        parts = (["length-balanced pairs"] if self.length_balanced else []) + (
            [f"learning rate x{self.lr_scale:g}"] if self.lr_scale != 1.0 else [])
        return " and ".join(parts) or "the round's settings"


def leans_longer(metrics: dict) -> bool:
    """The judge chose the longer answer in most of enough unequal-length pairs."""
    return (metrics.get(keys.UNEQUAL_LENGTH_PAIRS, 0) >= MIN_UNEQUAL_PAIRS
            and metrics.get(keys.LONGER_CHOSEN_FRACTION, 0.0) > 0.5)


def retry_attempt(metrics: dict, selfee) -> Attempt:
    """The retry: a smaller step (every harmful round measured had its chosen log-probs fall, the step-size failure),
    and, when the judge leaned to longer answers, length-balanced pairs too (the length failure)."""
    return Attempt(2, lr_scale=selfee.guard.lr_scale, length_balanced=leans_longer(metrics))


def balance_lengths(rows: list[dict]) -> list[dict]:
    """The paired rows to train on with no net length preference: every equal-length pair, and among unequal-length
    pairs as many with the shorter answer chosen as with the longer one, the judge's most confident of each first.

    With a length-biased judge this drops most longer-chosen pairs, so DPO no longer learns "longer is better" from
    labels that mostly say only that (per-token normalisation picked the same labels, a fixed length penalty made them
    coin flips: README, "Round guard and on-policy labels")."""
    longer, shorter, out = [], [], []
    for row in rows:
        if row.get("chosen_index") is None:
            continue
        lengths = row["completion_lengths"]
        w, l = lengths[row["chosen_index"]], lengths[row["rejected_index"]]
        (longer if w > l else shorter if w < l else out).append(row)
    keep = min(len(longer), len(shorter))
    for side in (longer, shorter):
        out += sorted(side, key=lambda r: -r["probability"])[:keep]
    kept = {row["prompt_id"] for row in out}
    return [row for row in rows if row["prompt_id"] in kept]


def verdict(signals: dict, round_metrics: dict, guard) -> list[str]:
    """Why the round looks harmful (empty: it passes). `signals` are the attempt's, `round_metrics` the judging's."""
    reasons = []
    drift = signals.get(keys.DRIFT_CHOSEN_PER_TOKEN)
    if drift is not None and drift < guard.min_chosen_drift:
        reasons.append(
            f"log-probs of the round's chosen answers fell by {-drift:.3f} nats/token during training "
            f"(guard.min_chosen_drift {guard.min_chosen_drift:g})"
        )
    ratio = signals.get(keys.DRIFT_RATIO)
    if ratio is not None and ratio > guard.max_drift_ratio:
        reasons.append(
            f"log-probs of the round's rejected answers fell {ratio:.1f}x as far as those of its chosen answers rose "
            f"(per token; guard.max_drift_ratio {guard.max_drift_ratio:g})"
        )
    growth = signals.get(keys.LENGTH_GROWTH)
    if growth is not None and growth > guard.max_length_growth and leans_longer(round_metrics):
        reasons.append(
            f"answers grew {growth:+.0%} after the round while the judge chose the longer answer in "
            f"{round_metrics[keys.LONGER_CHOSEN_FRACTION]:.0%} of unequal-length pairs "
            f"(guard.max_length_growth {guard.max_length_growth:g})"
        )
    accuracy = signals.get(keys.JUDGE_ACCURACY_ON_POLICY)
    if accuracy is not None and accuracy < guard.min_on_policy_accuracy:
        reasons.append(
            f"the judge agreed with the labels on {accuracy:.0%} of this round's labelled pairs "
            f"(guard.min_on_policy_accuracy {guard.min_on_policy_accuracy:g})"
        )
    return reasons


def guard_round(round_idx: int, selfee, round_metrics: dict, train_attempt: Callable, policies) -> list[str]:
    """Train round t under the guard: attempt, and on a verdict of harm restore pi_{t-1}, retry once, or stop.

    Args:
        round_metrics: the round's judging metrics; updated with the kept (or last) attempt's and the guard's.
        train_attempt: `Attempt -> (its metrics, the verdict's reasons)`: trains one attempt from the current policy.
        policies: the round loop's `policies.PolicyStore` (snapshot, restore, save).

    Returns:
        why the guard stopped the loop; empty when the round is kept (always with the guard off).
    """
    guard = selfee.guard
    start = policies.snapshot(round_idx) if guard.enabled else None
    attempt, rejected = Attempt(1), []
    while True:
        outcome, reasons = train_attempt(attempt)
        if not reasons or not guard.enabled:
            break
        rejected.append({"attempt": attempt.number, "with": attempt.describe(), "reasons": reasons})
        _reject(round_idx, attempt, outcome, reasons, start, policies)
        if attempt.number > 1:
            break
        attempt = retry_attempt(round_metrics, selfee)
        LOG.warning(f"selfee guard: retrying round {round_idx} once on the same judged pairs with {attempt.describe()}")
    round_metrics.update(outcome)
    round_metrics[keys.GUARD_REJECTED_ATTEMPTS] = float(len(rejected))
    if rejected:
        round_metrics[keys.GUARD_REJECTED] = rejected
    if reasons and guard.enabled:
        round_metrics[keys.GUARD_DECISION] = "stopped"
        return reasons
    round_metrics[keys.GUARD_DECISION] = (
        "off" if not guard.enabled else "accepted" if not rejected else "accepted_on_retry"
    )
    if reasons:  # guard off: say what it would have done
        round_metrics[keys.GUARD_WOULD_FIRE] = reasons
        LOG.warning(f"selfee round {round_idx}: the round guard (off) would have fired: {'; '.join(reasons)}")
    return []


def _reject(round_idx: int, attempt: Attempt, outcome: dict, reasons: list[str], start, policies) -> None:
    """Keep the rejected policy and its signals under `round_<t>/rejected/attempt_<k>/`; restore pi_{t-1}."""
    dest = rejected_dir(policies.root, round_idx, attempt.number)
    if keys.SECONDS_TRAIN in outcome:  # trained (a label disagreement rejects before training)
        policies.save(round_idx, policy_in(dest, policies.peft))
        policies.restore(start)
    if distributed.is_main():
        write_json(dest / METRICS_FILE, {**outcome, keys.GUARD_REASONS: reasons, "with": attempt.describe()})
    LOG.warning(
        f"selfee guard: round {round_idx} attempt {attempt.number} ({attempt.describe()}) rejected: "
        f"{'; '.join(reasons)}. The policy is back to pi_{round_idx - 1}; the rejected one is in {dest}."
    )


def stopped_message(state: dict) -> str:
    """What the user reads when the guard stopped the loop (`state`: the run's resume state)."""
    stop, completed = state["stopped"], state["completed"]
    final = f"round {max(completed)}'s policy" if completed else "the starting model"
    return (
        f"selfee: the round guard stopped the loop at round {stop['round']}: {'; '.join(stop['reasons'])}. "
        f"The final model is {final} (rounds after it did not run). To go further, start a new output_dir with "
        "a lower learning rate (selfee.round_learning_rate), length-robust judging, or more labels "
        "(selfee.labels); see the README, \"Round guard and on-policy labels\"."
    )
