"""The round guard: after a round's training, undo it when gold-free signals show harm, retry once, or stop.

The rule (`selfee.guard`, chosen from the sweep in `benchmarks/README.md` "Round guard"): a round is harmful when
    - the policy's log-probs on the round's own chosen answers fell during the round (per token, below
      `min_chosen_drift`): DPO pushing every answer down, likelihood displacement; in the guard study all 30
      self-annotation attempts that had them fall lost gold (round 0 at a high rate is a counterexample: below);
    - or they rose, but the rejected answers' log-probs fell more than `max_drift_ratio` times as far (per token): the
      margin won by pushing answers down rather than pulling the chosen ones up, the step before displacement. In the
      guard study every round with a ratio <= 2.0 raised gold (22 rounds, both tasks, lr 1e-4 and 5e-4) and none of
      the 8 above 3 (3.7-112) did (-0.035 to +0.004); the default 3 sits between them;
    - answers sampled after the round grew by more than `max_length_growth` while the judge had chosen the longer
      answer in most (of >= 10) unequal-length pairs: the length bias of SPEC section 3 feeding itself (on the
      variable-length demo, harmful rounds grew answers 137-215%, a neutral one 7-12%, helpful ones <= 1.4%);
    - the judge agreed with `selfee.labels` on fewer than `min_on_policy_accuracy` of this round's labelled pairs.
A fired round is restored to pi_{t-1} (the rejected policy is kept under `round_<t>/rejected/attempt_<k>/`) and
retried once on the same judged pairs at `lr_scale` x the learning rate, with length-balanced pairs too when the
judge leaned to longer answers. If the retry fires too, the loop stops; the final model is the last good round's.

Round 0 (seed DPO) is not guarded: judged offline by these rules, 3 seed rounds at lr 2e-3 that raised gold by ~0.1
would have fired (`benchmarks/guard_study.py --round-zero`), so the drift rules are evidence about self-annotation
rounds, not a law of DPO.
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
        parts = (["length-balanced pairs"] if self.length_balanced else []) + (
            [f"learning rate x{self.lr_scale:g}"] if self.lr_scale != 1.0 else [])
        return " and ".join(parts) or "the round's settings"


def leans_longer(metrics: dict) -> bool:
    """The judge chose the longer answer in most of enough unequal-length pairs."""
    return (metrics.get("selfee/unequal_length_pairs", 0) >= MIN_UNEQUAL_PAIRS
            and metrics.get("selfee/longer_chosen_fraction", 0.0) > 0.5)


def retry_attempt(metrics: dict, selfee) -> Attempt:
    """The retry: a smaller step (every harmful round measured had its chosen log-probs fall, the step-size failure),
    and, when the judge leaned to longer answers, length-balanced pairs too (the length failure)."""
    return Attempt(2, lr_scale=selfee.guard.lr_scale, length_balanced=leans_longer(metrics))


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
    ratio = signals.get("selfee/logps_drift_ratio")
    if ratio is not None and ratio > guard.max_drift_ratio:
        reasons.append(
            f"log-probs of the round's rejected answers fell {ratio:.1f}x as far as those of its chosen answers rose "
            f"(per token; guard.max_drift_ratio {guard.max_drift_ratio:g})"
        )
    growth = signals.get("selfee/length_growth")
    if growth is not None and growth > guard.max_length_growth and leans_longer(round_metrics):
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
