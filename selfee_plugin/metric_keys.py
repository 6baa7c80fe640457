"""Every metric SELFEE logs, named once: producers write these keys, the guard, the report and trackers read them.

The names follow TRL's style (`rewards/margins`, `logps/chosen`) under a `selfee/` prefix; the README's "Logged
metrics" defines each. A round's metrics row (`round_<t>/metrics.json`, `summary.json`) holds the keys below; the
trainer's own last log line is copied into it under `train/`.
"""

PREFIX = "selfee/"

# ---- the round (rounds.py)
ROUND = "selfee/round"
PAIRS = "selfee/pairs"
PAIRS_TRAINED = "selfee/pairs_trained"
SECONDS_TRAIN = "selfee/seconds_train"
LEARNING_RATE = "selfee/learning_rate"
POOL_ROWS_SKIPPED = "selfee/pool_rows_skipped"
WORLD_SIZE = "selfee/world_size"

# ---- annotation (annotate.py; reduced over ranks by distributed.REDUCTIONS)
PROMPTS_ANNOTATED = "selfee/prompts_annotated"
PROMPTS_RESUMED = "selfee/prompts_resumed"
SECONDS_GENERATE = "selfee/seconds_generate"
SECONDS_JUDGE = "selfee/seconds_judge"
GENERATION_TOKENS_PER_SECOND = "selfee/generation_tokens_per_second"
JUDGE_TOKENS_PER_SECOND = "selfee/judge_tokens_per_second"
GENERATION_BATCH_PROMPTS = "selfee/generation_batch_prompts"

# ---- judged rows (diagnostics.summarize_judged_rows)
PROMPTS_JUDGED = "selfee/prompts_judged"
MARGIN_MEAN = "selfee/margin_mean"
MARGIN_STD = "selfee/margin_std"
PREFERENCE_PROBABILITY_MEAN = "selfee/preference_probability_mean"
CHOSEN_LENGTH_MEAN = "selfee/chosen_length_mean"
REJECTED_LENGTH_MEAN = "selfee/rejected_length_mean"
RESPONSE_LENGTH_MEAN = "selfee/response_length_mean"
UNEQUAL_LENGTH_PAIRS = "selfee/unequal_length_pairs"
LONGER_CHOSEN_FRACTION = "selfee/longer_chosen_fraction"
TRUNCATED_FRACTION = "selfee/truncated_fraction"
DISTINCT_2 = "selfee/distinct_2"


def skipped(reason: str) -> str:
    """Prompts that made no pair for `reason` (one of `artifacts.SKIP_REASONS`)."""
    return f"selfee/skipped_{reason}"


# ---- judge accuracy on held-out human pairs (measurement.py)
JUDGE_ACCURACY = "selfee/judge_accuracy"
JUDGE_ACCURACY_AFTER = "selfee/judge_accuracy_after"
JUDGE_EVAL_PAIRS = "selfee/judge_eval_pairs"

# ---- after the round's training, without gold (diagnostics.post_round_signals, measurement.py)
DRIFT_CHOSEN = "selfee/logps_drift_chosen"
DRIFT_REJECTED = "selfee/logps_drift_rejected"
DRIFT_CHOSEN_PER_TOKEN = "selfee/logps_drift_chosen_per_token"
DRIFT_REJECTED_PER_TOKEN = "selfee/logps_drift_rejected_per_token"
DRIFT_RATIO = "selfee/logps_drift_ratio"
KL_PREVIOUS = "selfee/kl_previous"
JUDGE_AGREEMENT_AFTER = "selfee/judge_agreement_after"
REWARD_AFTER_MEAN = "selfee/reward_after_mean"
PROBE_LENGTH_BEFORE = "selfee/probe_length_before"
PROBE_LENGTH_AFTER = "selfee/probe_length_after"
LENGTH_GROWTH = "selfee/length_growth"
PROBE_TRUNCATED_AFTER = "selfee/probe_truncated_after"
KL_INITIAL_PROBE = "selfee/kl_initial_probe"
KL_PREVIOUS_PROBE = "selfee/kl_previous_probe"

# ---- on-policy labels (labels.py)
LABELS = "selfee/labels"
LABELS_FLIPPED = "selfee/labels_flipped"
JUDGE_ACCURACY_ON_POLICY = "selfee/judge_accuracy_on_policy"

# ---- the round guard (guard.py)
GUARD_DECISION = "selfee/guard_decision"
GUARD_REJECTED = "selfee/guard_rejected"
GUARD_REJECTED_ATTEMPTS = "selfee/guard_rejected_attempts"
GUARD_REASONS = "selfee/guard_reasons"
GUARD_WOULD_FIRE = "selfee/guard_would_fire"

# ---- per training step (trainer.py; TRL's log averages them, the round row copies the last under TRAIN)
NOISY_FRACTION = "selfee/noisy_fraction"
THRESHOLD = "selfee/threshold"
SMOOTHING_ACTIVE = "selfee/smoothing_active"
EXTRAPOLATED_MARGIN = "selfee/extrapolated_margin"

TRAIN = "train/"
# The trainer's log keys a round row keeps (as TRAIN + key).
TRAIN_LOG_KEYS = ("loss", "rewards/margins", "rewards/accuracies", NOISY_FRACTION, THRESHOLD)
