"""The round guard: after a round's training, undo it when gold-free signals show harm, retry once, or stop.

The rule (`selfee.guard`, chosen from the sweep in `benchmarks/README.md` "Round guard"): a round is harmful when
    - the policy's log-probs on the round's own chosen answers fell during the round (per token, below
      `min_chosen_drift`): DPO pushing every answer down, likelihood displacement, preceded every round that lowered
      gold on the demo, while every round that raised it moved them up;
    - answers sampled after the round grew by more than `max_length_growth` while the judge had chosen the longer
      answer in most unequal-length pairs: the length bias of SPEC section 3 feeding itself;
    - the judge agreed with `selfee.labels` on fewer than `min_on_policy_accuracy` of this round's labelled pairs.
A fired round is restored to pi_{t-1} (the rejected policy is kept under `round_<t>/rejected/attempt_<k>/`) and
retried once on the same judged pairs: with length-balanced pairs when the judge was length-biased, else at
`lr_scale` x the learning rate. If the retry fires too, the loop stops; the final model is the last good round's.
"""

from __future__ import annotations

from dataclasses import dataclass

# Fewer unequal-length pairs than this say nothing about a length bias.
MIN_UNEQUAL_PAIRS = 10


@dataclass(frozen=True)
class Attempt:
    number: int
    lr_scale: float = 1.0
    length_balanced: bool = False

    def describe(self) -> str:
        if self.length_balanced:
            return "length-balanced pairs"
        return "the round's settings" if self.lr_scale == 1.0 else f"learning rate x{self.lr_scale:g}"


def length_biased(metrics: dict, warning: float) -> bool:
    """The judge chose the longer answer in more than `judge.length_bias_warning` of enough unequal-length pairs."""
    return (metrics.get("selfee/unequal_length_pairs", 0) >= MIN_UNEQUAL_PAIRS
            and metrics.get("selfee/longer_chosen_fraction", 0.0) > warning)


def retry_attempt(metrics: dict, selfee) -> Attempt:
    if length_biased(metrics, selfee.judge.length_bias_warning):
        return Attempt(2, length_balanced=True)
    return Attempt(2, lr_scale=selfee.guard.lr_scale)


def balance_lengths(rows: list[dict]) -> list[dict]:
    """The paired rows to train on with no net length preference: every equal-length pair, and among unequal-length
    pairs as many with the shorter answer chosen as with the longer one, the judge's most confident of each first.

    With a length-biased judge this drops most longer-chosen pairs, so DPO no longer learns "longer is better" from
    labels that mostly say only that (SPEC section 3: per-token normalisation picked the same labels, a fixed length
    penalty made them coin flips)."""
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
    drift = signals.get("selfee/logps_drift_chosen_per_token")
    if drift is not None and drift < guard.min_chosen_drift:
        reasons.append(
            f"log-probs of the round's chosen answers fell by {-drift:.3f} nats/token during training "
            f"(guard.min_chosen_drift {guard.min_chosen_drift:g})"
        )
    growth = signals.get("selfee/length_growth")
    if (growth is not None and growth > guard.max_length_growth
            and round_metrics.get("selfee/longer_chosen_fraction", 0.0) > 0.5):
        reasons.append(
            f"answers grew {growth:+.0%} after the round while the judge chose the longer answer in "
            f"{round_metrics['selfee/longer_chosen_fraction']:.0%} of unequal-length pairs "
            f"(guard.max_length_growth {guard.max_length_growth:g})"
        )
    accuracy = signals.get("selfee/judge_accuracy_on_policy")
    if accuracy is not None and accuracy < guard.min_on_policy_accuracy:
        reasons.append(
            f"the judge agreed with the labels on {accuracy:.0%} of this round's labelled pairs "
            f"(guard.min_on_policy_accuracy {guard.min_on_policy_accuracy:g})"
        )
    return reasons
