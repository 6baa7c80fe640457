"""The SELFEE round loop: seed DPO, then generate -> judge -> noise-aware DPO per round, with per-round artifacts.

Supports:
    - Round 0: DPO on the seed pairs from `pi_init` (plain sigmoid loss), `selfee.seed_epochs` epochs.
    - Rounds t >= 1 (SPA section 3, Algorithm 1): sample `samples_per_prompt` responses for the next unused chunk of
      the prompt pool from `pi_{t-1}`, judge them with r = log pi_{t-1} - log pi_init (Eq. 3-4), train DPO from
      `pi_{t-1}` with reference `pi_{t-1}` (or `pi_init`, `selfee.dpo_reference: initial`) and the noise-aware loss,
      under the round guard (`guard.guard_round`), measured by `measurement.RoundMeasurement`.
    - References as `references.py` describes; artifacts as `artifacts.py` lays them out; policies as
      `policies.PolicyStore` keeps them; resume as `resume.py` checks it (a finished round is loaded, a half-judged
      round continues from its pairs file).
    - Several processes (DDP, DeepSpeed ZeRO-1/2; `distributed.py`): each rank judges its shard of the round's
      prompts (`annotate.annotate_round`), and every rank trains on the merged file. Rank 0 alone writes state,
      summary, metrics and adapters.

Assumptions:
    - Every rank holds the whole model (ZeRO-3, FSDP, tensor/context parallelism are refused before loading, in
      `distributed.check_parallelism`); the trainer is a SelfeeDPOTrainer built with a `RunContext` whose
      `data_checks.preflight` has run.
    - The judged `log pi_{t-1}` values are the exact reference log-probs of round t's DPO (same float32 path), so
      with `refine.extrapolation == 0` training runs no reference forward pass.

Raises:
    RuntimeError: the launcher started several processes but the trainer runs one (`distributed.check_world`).
"""

from __future__ import annotations

import json
import time

from . import distributed
from . import metric_keys as keys
from ._logging import get_logger
from .annotate import annotate_round
from .artifacts import AUTO_EVAL_FILE, METRICS_FILE, PAIRS_FILE, SUMMARY_FILE, checkpoints_dir, judged_pairs_dataset
from .artifacts import round_dir, write_json, write_rows
from .guard import Attempt, balance_lengths, guard_round, stopped_message, verdict
from .labels import apply_labels, shared_round_labels
from .measurement import RoundMeasurement
from .policies import PolicyStore
from .references import init_judge_reference, snapshot_dpo_reference
from .report import write_report
from .resume import save_state

LOG = get_logger(__name__)


def _fire(trainer, event: str, **kwargs) -> None:
    """Round boundaries as callback events: any callback may define `on_selfee_round_begin/_end`."""
    for callback in trainer.callback_handler.callbacks:
        handler = getattr(callback, event, None)
        if handler is not None:
            handler(trainer.args, trainer.state, trainer.control, **kwargs)


class RoundRunner:
    """Runs the rounds of one `train()` call: which round comes next, its data, its schedule, and its record."""

    def __init__(self, trainer, train_fn):
        self.trainer, self.train_fn = trainer, train_fn
        run = trainer.run_context
        self.selfee, self.state, self.pool = run.selfee, run.state, run.pool
        self.root = run.root
        self.root.mkdir(parents=True, exist_ok=True)
        distributed.check_world(trainer)
        if distributed.is_main():
            save_state(self.root, self.state)
            if run.held_out_seed_pairs:  # which seed pairs `eval_pairs: auto` held out
                write_rows(self.root / AUTO_EVAL_FILE, run.eval_rows)
        self.policies = PolicyStore(trainer, self.root)
        self.judge_reference = init_judge_reference(trainer.model, trainer, self.selfee.judge.reference_model)
        self.measure = RoundMeasurement(trainer, self.selfee, run.eval_rows, self.judge_reference)
        self.last_output = None

    def run(self) -> None:
        selfee, trainer = self.selfee, self.trainer
        if self.state["completed"] or self.state.get("stopped"):
            self._write_record()  # a kill after state.json but before the summary or report left them stale
        if self.state.get("stopped"):
            LOG.warning(stopped_message(self.state))
            if self.state["completed"]:
                self.policies.load(max(self.state["completed"]))
            return
        planned = set(range(1, len(selfee.round_sizes) + 1))
        if self.state["completed"] and planned <= set(self.state["completed"]):
            LOG.info(f"selfee: every round in {self.root} is already finished; nothing to train")
            self.policies.load(max(self.state["completed"]))
            return
        seeded = trainer.train_dataset is not None and len(trainer.train_dataset) > 0
        if seeded:
            self.run_seed_round()
        else:
            LOG.info("selfee round 0 skipped: no seed pairs")
        chunks = self.pool.chunks(selfee.round_sizes) if selfee.round_sizes else []
        for round_idx, prompts in enumerate(chunks, start=1):
            if not self.run_round(round_idx, prompts):
                return
        LOG.info(f"selfee: all {len(chunks) + seeded} rounds finished; summary in {self.root / SUMMARY_FILE}")

    def run_seed_round(self) -> None:
        trainer = self.trainer
        if 0 in self.state["completed"]:
            LOG.info("selfee round 0 (seed) already finished: loading its policy")
            self.policies.load(0)
            return
        _fire(trainer, "on_selfee_round_begin", round_idx=0)
        LOG.info(f"selfee round 0: DPO on {len(trainer.train_dataset)} seed pairs, {self.selfee.seed_epochs} epoch(s)")
        seconds = self._train(0, trainer.train_dataset, self.selfee.seed_epochs, refine=False)
        self.policies.save(0)
        metrics = {keys.ROUND: 0, keys.PAIRS: len(trainer.train_dataset), keys.SECONDS_TRAIN: seconds}
        metrics.update(self._final_train_metrics())
        self._finish(0, metrics)

    def run_round(self, round_idx: int, prompts) -> bool:
        """Annotate, label-check and train round t under the guard. Returns False when the guard stopped the loop."""
        trainer, selfee = self.trainer, self.selfee
        if round_idx in self.state["completed"]:
            LOG.info(f"selfee round {round_idx} already finished: loading its policy")
            self.policies.load(round_idx)
            return True
        _fire(trainer, "on_selfee_round_begin", round_idx=round_idx)
        rdir = round_dir(self.root, round_idx)
        LOG.info(f"selfee round {round_idx}: generating and judging {len(prompts)} prompts")
        metrics = {keys.ROUND: round_idx, keys.POOL_ROWS_SKIPPED: float(sum(self.pool.skipped.values()))}
        annotated, rows = annotate_round(
            trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, round_idx, prompts, selfee,
            trainer.beta, rdir / PAIRS_FILE, self.judge_reference, trainer.args.max_length,
        )
        metrics.update(annotated)
        metrics.update(self.measure.judge_accuracy())
        labels = shared_round_labels(rows, selfee.labels, rdir) if selfee.labels.per_round else {}
        if selfee.dpo_reference == "previous":
            snapshot_dpo_reference(trainer.model, trainer)
        reasons = guard_round(
            round_idx, selfee, metrics, lambda attempt: self._attempt(round_idx, rows, labels, attempt, metrics),
            self.policies,
        )
        if reasons:
            self.state["stopped"] = {"round": round_idx, "reasons": reasons}
            self._finish(round_idx, metrics, completed=False)
            LOG.warning(stopped_message(self.state))
            return False
        self.policies.save(round_idx)
        self._finish(round_idx, metrics)
        return True

    def _attempt(self, round_idx: int, rows: list[dict], labels: dict, attempt: Attempt, round_metrics: dict):
        """Train one attempt of round t on its judged pairs (labels applied); returns its metrics and the guard's
        reasons to reject it. A judge that disagrees with the labels is rejected before any training."""
        trainer, selfee = self.trainer, self.selfee
        train_rows = balance_lengths(rows) if attempt.length_balanced else rows
        train_rows, outcome = apply_labels(train_rows, labels)
        pairs = judged_pairs_dataset(train_rows, reference=selfee.dpo_reference)
        outcome[keys.PAIRS_TRAINED] = float(len(pairs))
        reasons = verdict(outcome, round_metrics, selfee.guard)
        if reasons:
            return outcome, reasons
        if len(pairs) == 0:
            LOG.warning(f"selfee round {round_idx}: no usable pair to train on; the policy is left unchanged")
            return outcome, []
        dataset = trainer._prepare_dataset(pairs, trainer.processing_class, trainer.args, f"selfee_round_{round_idx}")
        LOG.info(
            f"selfee round {round_idx}: DPO on {len(pairs)} judged pairs, {selfee.round_epochs} epoch(s)"
            + (f", attempt {attempt.number} with {attempt.describe()}" if attempt.number > 1 else "")
        )
        outcome[keys.SECONDS_TRAIN] = self._train(round_idx, dataset, selfee.round_epochs, True, attempt)
        outcome[keys.LEARNING_RATE] = trainer.args.learning_rate
        outcome.update(self._final_train_metrics())
        outcome.update(self.measure.after_round(round_idx, train_rows))
        return outcome, verdict(outcome, round_metrics, selfee.guard)

    # ---- training one round ---------------------------------------------------------------------------------

    def _set_schedule(self, epochs: float, refine: bool, lr_scale: float = 1.0) -> None:
        """A fresh optimizer and learning-rate schedule per round, as the paper's separate runs have; rounds t >= 1
        take `selfee.round_learning_rate` / `round_micro_batch_size` where set, the seed Axolotl's own values."""
        args, cfg, selfee = self.trainer.args, self.trainer.run_context.cfg, self.selfee
        args.num_train_epochs = epochs
        rate = (refine and selfee.round_learning_rate) or cfg.learning_rate or args.learning_rate
        args.learning_rate = lr_scale * rate
        args.per_device_train_batch_size = (
            (refine and selfee.round_micro_batch_size) or cfg.micro_batch_size or args.per_device_train_batch_size
        )
        self.trainer._train_batch_size = args.train_batch_size  # transformers reads the batch size from here
        # Axolotl sets max_steps from the seed set's size; each round has its own size.
        args.max_steps = cfg.max_steps or -1
        if cfg.warmup_steps is None:
            # transformers 5 reads a warmup_steps below 1 as a ratio of each run's steps.
            args.warmup_steps = cfg.warmup_ratio if cfg.warmup_ratio is not None else 0.03
        self.trainer.optimizer = None
        self.trainer.lr_scheduler = None

    def _train(self, round_idx: int, dataset, epochs: float, refine: bool, attempt: Attempt = Attempt(1)) -> float:
        trainer, args = self.trainer, self.trainer.args
        trainer.train_dataset = dataset
        self._set_schedule(epochs, refine, attempt.lr_scale)
        trainer.begin_round(refine=refine)
        output_dir, args.output_dir = args.output_dir, str(checkpoints_dir(self.root, round_idx, attempt.number))
        start = time.monotonic()
        try:
            self.last_output = self.train_fn()
        finally:
            args.output_dir = output_dir
        return time.monotonic() - start

    def _final_train_metrics(self) -> dict:
        logs = [h for h in self.trainer.state.log_history if "loss" in h]
        return {keys.TRAIN + k: logs[-1][k] for k in keys.TRAIN_LOG_KEYS if logs and k in logs[-1]}

    # ---- the record ---------------------------------------------------------------------------------------------

    def _finish(self, round_idx: int, metrics: dict, completed: bool = True) -> None:
        """Record a round: finished (`completed`), or the round at which the guard stopped the loop."""
        if completed:
            self.state["completed"].append(round_idx)
        if distributed.is_main():  # every rank holds the same metrics (reduced in `annotate_round`)
            write_json(round_dir(self.root, round_idx) / METRICS_FILE, metrics)
            save_state(self.root, self.state)
        self._write_record()
        _fire(self.trainer, "on_selfee_round_end", round_idx=round_idx, metrics=metrics)
        numeric = {k: v for k, v in metrics.items() if k.startswith(keys.PREFIX) and isinstance(v, (int, float))}
        # Through the trainer's log, so the round's metrics reach the user's trackers (wandb, tensorboard, ...).
        self.trainer.log({k: float(v) for k, v in numeric.items()})
        shown = {k.split("/", 1)[1]: round(v, 4) if isinstance(v, float) else v for k, v in numeric.items()}
        LOG.info(f"selfee round {round_idx} {'done' if completed else 'stopped'}: {shown}")

    def _write_record(self) -> None:
        """`summary.json` and the report, derived from the state and each recorded round's `metrics.json` (rank 0)."""
        if distributed.is_main():
            write_json(self.root / SUMMARY_FILE, self._all_metrics())
            write_report(self.root.parent)

    def _all_metrics(self) -> list[dict]:
        rows = []
        stopped = [self.state["stopped"]["round"]] if self.state.get("stopped") else []
        for idx in sorted(self.state["completed"]) + stopped:
            path = round_dir(self.root, idx) / METRICS_FILE
            if path.exists():
                rows.append(json.loads(path.read_text()))
        return rows


def run_rounds(trainer, train_fn):
    """Entry point called from `SelfeeDPOTrainer.train`; returns the last round's TrainOutput (None if all resumed)."""
    runner = RoundRunner(trainer, train_fn)
    runner.run()
    return runner.last_output
