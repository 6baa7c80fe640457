"""The SELFEE round loop: seed DPO, then generate -> judge -> noise-aware DPO per round, with per-round artifacts.

Supports:
    - Round 0: DPO on the seed pairs from `pi_init` (plain sigmoid loss), `selfee.seed_epochs` epochs.
    - Rounds t >= 1 (SPA section 3, Algorithm 1): sample `samples_per_prompt` responses for the next unused chunk of
      the prompt pool from `pi_{t-1}`, judge them with r = log pi_{t-1} - log pi_init (Eq. 3-4), train DPO from
      `pi_{t-1}` with reference `pi_{t-1}` (or `pi_init`, `selfee.dpo_reference: initial`) and the noise-aware loss.
    - References as `references.py` describes; artifacts as `artifacts.py` lays them out; resume as `resume.py`
      checks it (a finished round is loaded, a half-judged round continues from its pairs file).
    - Several processes (DDP, DeepSpeed ZeRO-1/2; `distributed.py`): each rank generates and judges its shard of the
      round's prompts from its unwrapped model into its own part file, rank 0 merges them into `pairs.jsonl` in
      prompt order, and every rank trains on the merged file; resume reads every file of the round, so it works
      with any number of processes. Rank 0 alone writes state, summary, metrics and adapters.

Assumptions:
    - Every rank holds the whole model (ZeRO-3, FSDP, tensor/context parallelism are refused before loading, in
      `distributed.check_parallelism`); the trainer is a SelfeeDPOTrainer.
    - The judged `log pi_{t-1}` values are the exact reference log-probs of round t's DPO (same float32 path), so
      with `refine.extrapolation == 0` training runs no reference forward pass.

Raises:
    ValueError: resuming with settings that changed what earlier rounds computed (see `resume.check_resume`).
    RuntimeError: the launcher started several processes but the trainer runs one (`distributed.check_world`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from accelerate.utils import is_peft_model

from . import distributed
from ._logging import get_logger
from .artifacts import METRICS_FILE, PAIRS_FILE, SUMMARY_FILE, judged_pairs_dataset, policy_dir, round_dir, selfee_root
from .artifacts import AUTO_EVAL_FILE, append_rows, merge_pairs_parts, pairs_part_path, read_judged_rows
from .artifacts import read_round_rows, write_json
from .diagnostics import summarize_judged_rows
from .guard import Attempt, balance_lengths, retry_attempt, verdict
from .labels import LabelsNeeded, apply_labels, round_labels
from .references import adapter_parameters, init_judge_reference, snapshot_dpo_reference
from .report import write_report
from .resume import check_resume, save_state

LOG = get_logger(__name__)


def _fire(trainer, event: str, **kwargs) -> None:
    """Round boundaries as callback events: any callback may define `on_selfee_round_begin/_end`."""
    for callback in trainer.callback_handler.callbacks:
        handler = getattr(callback, event, None)
        if handler is not None:
            handler(trainer.args, trainer.state, trainer.control, **kwargs)


class RoundRunner:
    """Owns the run: references, datasets, schedules, artifacts and resume state."""

    def __init__(self, trainer, train_fn):
        self.trainer = trainer
        self.train_fn = train_fn
        self.selfee = trainer.selfee
        self.model = trainer.model
        self.peft = is_peft_model(self.model)
        self.root = selfee_root(trainer.args.output_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        # Checked in the plugin's pre_model_load (before any weights load); checked here too for direct callers.
        self.state = trainer.selfee_state or check_resume(
            trainer.axolotl_cfg, self.selfee, trainer.prompt_pool, trainer.args.output_dir
        )
        distributed.check_world(trainer)
        if distributed.is_main():
            save_state(self.root, self.state)
        self.judge_reference = init_judge_reference(self.model, trainer, self.selfee.judge.reference_model)
        self.last_output = None
        self._eval_rows = None  # judge.eval_pairs, loaded on first use
        if trainer.auto_eval_rows and distributed.is_main():  # which seed pairs `eval_pairs: auto` held out
            with open(self.root / AUTO_EVAL_FILE, "w", encoding="utf-8") as f:
                append_rows(f, trainer.auto_eval_rows)

    # ---- persistence -------------------------------------------------------------------------------------

    def save_policy(self, round_idx: int, out: Path | None = None) -> None:
        out = out or policy_dir(self.root, round_idx, self.peft)
        if self.peft:
            if distributed.is_main():
                self.model.save_pretrained(str(out), selected_adapters=["default"])
        else:
            self.trainer.save_model(str(out))  # every rank calls it; it writes on the main process only

    def load_policy(self, round_idx: int) -> None:
        src = policy_dir(self.root, round_idx, self.peft)
        if self.peft:
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            set_peft_model_state_dict(self.model, load_peft_weights(str(src)), adapter_name="default")
        else:
            from transformers import AutoModelForCausalLM

            state = AutoModelForCausalLM.from_pretrained(str(src), dtype=self.model.dtype).state_dict()
            self.trainer.accelerator.unwrap_model(self.model).load_state_dict(state)

    def _finish(self, round_idx: int, metrics: dict, completed: bool = True) -> None:
        """Record a round: finished (`completed`), or the round at which the guard stopped the loop."""
        if completed:
            self.state["completed"].append(round_idx)
        if distributed.is_main():  # every rank holds the same metrics (reduced in `annotate_round`)
            write_json(round_dir(self.root, round_idx) / METRICS_FILE, metrics)
            save_state(self.root, self.state)
            write_json(self.root / SUMMARY_FILE, self._all_metrics())
            write_report(self.root.parent)
        _fire(self.trainer, "on_selfee_round_end", round_idx=round_idx, metrics=metrics)
        numeric = {k: v for k, v in metrics.items() if k.startswith("selfee/") and isinstance(v, (int, float))}
        # Through the trainer's log, so the round's metrics reach the user's trackers (wandb, tensorboard, ...).
        self.trainer.log({k: float(v) for k, v in numeric.items()})
        shown = {k.split("/", 1)[1]: round(v, 4) if isinstance(v, float) else v for k, v in numeric.items()}
        LOG.info(f"selfee round {round_idx} {'done' if completed else 'stopped'}: {shown}")

    def _all_metrics(self) -> list[dict]:
        rows = []
        stopped = [self.state["stopped"]["round"]] if self.state.get("stopped") else []
        for idx in sorted(self.state["completed"]) + stopped:
            path = round_dir(self.root, idx) / METRICS_FILE
            if path.exists():
                rows.append(json.loads(path.read_text()))
        return rows

    # ---- training one round ---------------------------------------------------------------------------------

    def _set_schedule(self, epochs: float, refine: bool, lr_scale: float = 1.0) -> None:
        """A fresh optimizer and learning-rate schedule per round, as the paper's separate runs have; rounds t >= 1
        take `selfee.round_learning_rate` / `round_micro_batch_size` where set, the seed Axolotl's own values."""
        args, cfg, selfee = self.trainer.args, self.trainer.axolotl_cfg, self.selfee
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
        # Each round's (and retry's) HF checkpoints go to its own folder: `checkpoint-<step>` restarts at 1.
        folder = "checkpoints" if attempt.number == 1 else f"checkpoints_attempt_{attempt.number}"
        output_dir, args.output_dir = args.output_dir, str(round_dir(self.root, round_idx) / folder)
        start = time.monotonic()
        try:
            self.last_output = self.train_fn()
        finally:
            args.output_dir = output_dir
        return time.monotonic() - start

    def run_seed_round(self) -> None:
        trainer = self.trainer
        if 0 in self.state["completed"]:
            LOG.info("selfee round 0 (seed) already finished: loading its policy")
            self.load_policy(0)
            return
        _fire(trainer, "on_selfee_round_begin", round_idx=0)
        LOG.info(f"selfee round 0: DPO on {len(trainer.train_dataset)} seed pairs, {self.selfee.seed_epochs} epoch(s)")
        seconds = self._train(0, trainer.train_dataset, self.selfee.seed_epochs, refine=False)
        self.save_policy(0)
        metrics = {"selfee/round": 0, "selfee/pairs": len(trainer.train_dataset), "selfee/seconds_train": seconds}
        metrics.update(self._final_train_metrics())
        self._finish(0, metrics)

    def run_round(self, round_idx: int, prompts) -> bool:
        """Annotate, label-check and train round t under the guard. Returns False when the guard stopped the loop."""
        trainer, selfee = self.trainer, self.selfee
        if round_idx in self.state["completed"]:
            LOG.info(f"selfee round {round_idx} already finished: loading its policy")
            self.load_policy(round_idx)
            return True
        _fire(trainer, "on_selfee_round_begin", round_idx=round_idx)
        rdir = round_dir(self.root, round_idx)
        LOG.info(f"selfee round {round_idx}: generating and judging {len(prompts)} prompts")
        metrics = {"selfee/round": round_idx}
        pool_skips = trainer.prompt_pool.skipped if trainer.prompt_pool is not None else {}
        metrics["selfee/pool_rows_skipped"] = float(sum(pool_skips.values()))
        annotated, rows = self.annotate_round(round_idx, prompts, rdir / PAIRS_FILE)
        metrics.update(annotated)
        metrics.update(self.judge_accuracy())
        labels = self._round_labels(rows, rdir) if selfee.labels.per_round else {}
        if selfee.dpo_reference == "previous":
            snapshot_dpo_reference(self.model, trainer)
        start = self._snapshot(round_idx)
        attempt, rejected = Attempt(1), []
        while True:
            outcome, reasons = self._attempt(round_idx, rows, labels, attempt, metrics)
            if not reasons or not selfee.guard.enabled:
                break
            rejected.append({"attempt": attempt.number, "with": attempt.describe(), "reasons": reasons})
            self._reject(round_idx, attempt, outcome, reasons, start)
            if attempt.number > 1:
                break
            attempt = retry_attempt(metrics, selfee)
            LOG.warning(
                f"selfee guard: retrying round {round_idx} once on the same judged pairs with {attempt.describe()}"
            )
        metrics.update(outcome)
        metrics["selfee/guard_rejected_attempts"] = float(len(rejected))
        if rejected:
            metrics["selfee/guard_rejected"] = rejected
        if reasons and selfee.guard.enabled:
            metrics["selfee/guard_decision"] = "stopped"
            self.state["stopped"] = {"round": round_idx, "reasons": reasons}
            self._finish(round_idx, metrics, completed=False)
            LOG.warning(self._stopped_message())
            return False
        metrics["selfee/guard_decision"] = (
            "off" if not selfee.guard.enabled else "accepted" if not rejected else "accepted_on_retry"
        )
        if reasons:  # guard off: say what it would have done
            metrics["selfee/guard_would_fire"] = reasons
            LOG.warning(f"selfee round {round_idx}: the round guard (off) would have fired: {'; '.join(reasons)}")
        self.save_policy(round_idx)
        self._finish(round_idx, metrics)
        return True

    def _round_labels(self, rows: list[dict], rdir: Path) -> dict[str, str]:
        """`labels.round_labels` on rank 0 (it writes `to_label.jsonl` and may call the labeller); every rank gets
        the same labels, or raises the same stop or error, so no rank waits for another that has left."""
        outcome = None
        if distributed.is_main():
            try:
                outcome = round_labels(rows, self.selfee.labels, rdir)
            except (Exception, LabelsNeeded) as error:
                outcome = error
        outcome = distributed.broadcast(outcome)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _attempt(self, round_idx: int, rows: list[dict], labels: dict, attempt: Attempt, round_metrics: dict):
        """Train one attempt of round t on its judged pairs (labels applied); returns its metrics and the guard's
        reasons to reject it. A judge that disagrees with the labels is rejected before any training."""
        trainer, selfee = self.trainer, self.selfee
        train_rows = balance_lengths(rows) if attempt.length_balanced else rows
        train_rows, outcome = apply_labels(train_rows, labels)
        pairs = judged_pairs_dataset(train_rows, reference=selfee.dpo_reference)
        outcome["selfee/pairs_trained"] = float(len(pairs))
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
        outcome["selfee/seconds_train"] = self._train(round_idx, dataset, selfee.round_epochs, True, attempt)
        outcome["selfee/learning_rate"] = trainer.args.learning_rate
        outcome.update(self._final_train_metrics())
        outcome.update(self.signals_after_round(round_idx, train_rows))
        return outcome, verdict(outcome, round_metrics, selfee.guard)

    def _snapshot(self, round_idx: int):
        """pi_{t-1}'s weights, for the guard to restore: the LoRA adapter's tensors, or under full fine-tuning the
        previous round's saved model (a CPU copy of the whole model only when none was saved)."""
        if not self.selfee.guard.enabled:
            return None
        model = self.trainer.accelerator.unwrap_model(self.model)
        if self.peft:
            return {n: p.detach().to("cpu", copy=True) for n, p in adapter_parameters(model).items()}
        if policy_dir(self.root, round_idx - 1, False).exists():
            return round_idx - 1
        return {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}

    def _restore(self, snapshot) -> None:
        if isinstance(snapshot, int):
            self.load_policy(snapshot)
            return
        model = self.trainer.accelerator.unwrap_model(self.model)
        if self.peft:
            with torch.no_grad():
                for name, param in adapter_parameters(model).items():
                    param.copy_(snapshot[name])
        else:
            model.load_state_dict(snapshot)

    def _reject(self, round_idx: int, attempt: Attempt, outcome: dict, reasons: list[str], start) -> None:
        """Keep the rejected policy and its signals under `round_<t>/rejected/attempt_<k>/`; restore pi_{t-1}."""
        dest = round_dir(self.root, round_idx) / "rejected" / f"attempt_{attempt.number}"
        dest.mkdir(parents=True, exist_ok=True)
        if "selfee/seconds_train" in outcome:
            self.save_policy(round_idx, dest / ("adapter" if self.peft else "model"))
            self._restore(start)
        if distributed.is_main():
            write_json(dest / METRICS_FILE, {**outcome, "selfee/guard_reasons": reasons, "with": attempt.describe()})
        LOG.warning(
            f"selfee guard: round {round_idx} attempt {attempt.number} ({attempt.describe()}) rejected: "
            f"{'; '.join(reasons)}. The policy is back to pi_{round_idx - 1}; the rejected one is in {dest}."
        )

    def _stopped_message(self) -> str:
        stop, completed = self.state["stopped"], self.state["completed"]
        final = f"round {max(completed)}'s policy" if completed else "the starting model"
        return (
            f"selfee: the round guard stopped the loop at round {stop['round']}: {'; '.join(stop['reasons'])}. "
            f"The final model is {final} (rounds after it did not run). To go further, start a new output_dir with "
            "a lower learning rate (selfee.round_learning_rate), length-robust judging, or more labels "
            "(selfee.labels); see the README, \"Round guard and on-policy labels\"."
        )

    def annotate_round(self, round_idx: int, prompts, pairs_path) -> tuple[dict, list[dict]]:
        """Generate and judge the round's prompts not judged yet, each rank its shard; rank 0 merges the rows.

        Rank 0 reads which prompts every file of the round already holds (written by any earlier run, with any number
        of processes) and broadcasts their ids, so all ranks deal the same remaining list; rank r takes every
        world-th prompt of it (`distributed.shard`). A prompt is judged once, by one rank, whatever the world size.

        Returns:
            metrics: `summarize_judged_rows` over the merged file, the ranks' timings and `selfee/prompts_annotated`
                reduced (`distributed.REDUCTIONS`), `selfee/prompts_resumed` and `selfee/world_size`;
            rows: the merged file's judged rows. Both the same on every rank.
        """
        from .annotate import annotate

        trainer, selfee = self.trainer, self.selfee
        world, rank = distributed.world_size(), distributed.rank()
        order = [str(pid) for pid, _ in prompts]
        done = distributed.broadcast(
            {row["prompt_id"] for row in read_round_rows(pairs_path)} & set(order) if distributed.is_main() else None
        )
        todo = [(str(pid), messages) for pid, messages in prompts if str(pid) not in done]
        if done:
            LOG.info(f"selfee round {round_idx}: resuming: {len(done)} prompt(s) already judged, {len(todo)} to go")
        if world > 1:
            LOG.info(f"selfee round {round_idx}: {len(todo)} prompt(s) sharded over {world} processes")
        out_path = pairs_path if world == 1 else pairs_part_path(pairs_path, rank)
        mine = distributed.shard(todo, rank, world)
        local = annotate(
            trainer.accelerator.unwrap_model(self.model), trainer.processing_class, mine, selfee, beta=trainer.beta,
            out_path=str(out_path), reference=self.judge_reference, seed=selfee.generation.seed + round_idx,
            max_length=trainer.args.max_length, summarize=False,
        )
        local["selfee/prompts_annotated"] = float(len(mine))
        per_rank = distributed.gather(local)  # returns once every rank has written its rows
        if distributed.is_main():
            merge_pairs_parts(pairs_path, order)  # also folds in part files left by an interrupted run
        distributed.barrier()
        rows = read_judged_rows(pairs_path)
        metrics = summarize_judged_rows(rows, selfee.judge.length_bias_warning)
        metrics.update(distributed.reduce_metrics(per_rank))
        metrics["selfee/prompts_resumed"] = float(len(done))
        metrics["selfee/world_size"] = float(world)
        return metrics, rows

    def signals_after_round(self, round_idx: int, rows: list[dict]) -> dict:
        """Signals that need no gold: the round's trained rows re-scored by pi_t (each rank its shard), see
        `diagnostics.post_round_signals`; the length probe; held-out judge accuracy under pi_t."""
        from .diagnostics import post_round_signals
        from .judge import rescore_rows

        mine = distributed.shard(list(range(len(rows))), distributed.rank(), distributed.world_size())
        scores = rescore_rows(
            self.trainer.accelerator.unwrap_model(self.model), self.trainer.processing_class, [rows[i] for i in mine],
            self.selfee.judge.batch_tokens, self.trainer.args.max_length, self.selfee.judge.share_prompts,
        )
        after = [None] * len(rows)
        for part in distributed.gather(list(zip(mine, scores))):
            for i, logps in part:
                after[i] = logps
        signals = post_round_signals(rows, after)
        signals.update(self.length_probe(round_idx, rows))
        accuracy = self.judge_accuracy()
        if accuracy:
            signals["selfee/judge_accuracy_after"] = accuracy["selfee/judge_accuracy"]
        return signals

    def length_probe(self, round_idx: int, rows: list[dict]) -> dict:
        """Answers sampled from pi_t for the round's first `guard.probe_prompts` prompts, against the round's own
        samples of them (from pi_{t-1}, same settings): does the round make answers longer or cut them off? The same
        samples, scored under pi_t, pi_{t-1} and pi_init, estimate KL(pi_t || pi_{t-1}) and KL(pi_t || pi_init)."""
        from .formatting import format_completion, tokenize_completion
        from .generation import make_sampler
        from .judge import score_sequences
        from .references import dpo_reference

        selfee, trainer = self.selfee, self.trainer
        tokenizer, model = trainer.processing_class, trainer.accelerator.unwrap_model(self.model)
        probe = [row for row in rows if row.get("responses")][: selfee.guard.probe_prompts]
        if not probe:
            return {}
        mine = distributed.shard(probe, distributed.rank(), distributed.world_size())
        gens = make_sampler(model, tokenizer, selfee.generation).generate(
            [row["messages"] for row in mine], selfee.samples_per_prompt, selfee.generation.seed + round_idx
        )

        def tokens(texts):
            return [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]

        before, after, cut, sequences = [], [], [], []
        for row, prompt, responses, finished in zip(mine, gens.prompts, gens.responses, gens.finished):
            if responses is not None:
                before, after, cut = before + tokens(row["responses"]), after + tokens(responses), cut + finished
                sequences += [
                    tokenize_completion(tokenizer, prompt, format_completion(tokenizer, t)) for t in responses
                ]
        kl_init, kl_prev = [], []
        if sequences:
            budget, max_length = selfee.judge.batch_tokens, trainer.args.max_length
            share = selfee.judge.share_prompts
            now, init, _, _ = score_sequences(model, tokenizer, sequences, self.judge_reference, budget, max_length,
                                              share)
            kl_init = (now - init).tolist()
            if selfee.dpo_reference == "previous":  # the DPO reference (`ref` snapshot or frozen copy) is pi_{t-1}
                _, prev, _, _ = score_sequences(model, tokenizer, sequences, dpo_reference(trainer), budget,
                                                max_length, share)
                kl_prev = (now - prev).tolist()
        parts = distributed.gather((before, after, cut, kl_init, kl_prev))
        before, after, cut, kl_init, kl_prev = (sum(part, []) for part in zip(*parts))
        if not before:
            return {}
        mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
        signals = {
            "selfee/probe_length_before": mean_before,
            "selfee/probe_length_after": mean_after,
            "selfee/length_growth": mean_after / mean_before - 1 if mean_before else 0.0,
            "selfee/probe_truncated_after": sum(not f for f in cut) / len(cut),
        }
        if kl_init:
            signals["selfee/kl_initial_probe"] = sum(kl_init) / len(kl_init)
        if kl_prev:
            signals["selfee/kl_previous_probe"] = sum(kl_prev) / len(kl_prev)
        return signals

    def judge_accuracy(self) -> dict:
        if not self.selfee.judge.eval_pairs:
            return {}
        from .judge import judge_accuracy, load_eval_pairs

        if self._eval_rows is None:
            entry = self.selfee.judge.eval_pairs
            self._eval_rows = (self.trainer.auto_eval_rows if entry == "auto"
                               else load_eval_pairs(entry, self.trainer.processing_class))
        rows = distributed.shard(self._eval_rows, distributed.rank(), distributed.world_size())
        accuracy = judge_accuracy(
            self.model, self.trainer.processing_class, rows, reference=self.judge_reference,
            max_tokens=self.selfee.judge.batch_tokens, length_normalize=self.selfee.judge.length_normalize,
            max_length=self.trainer.args.max_length, share_prompts=self.selfee.judge.share_prompts,
        )
        accuracy = distributed.weighted_mean(distributed.gather((accuracy, len(rows))))
        return {"selfee/judge_accuracy": accuracy, "selfee/judge_eval_pairs": len(self._eval_rows)}

    def _final_train_metrics(self) -> dict:
        logs = [h for h in self.trainer.state.log_history if "loss" in h]
        keys = ("loss", "rewards/margins", "rewards/accuracies", "selfee/noisy_fraction", "selfee/threshold")
        return {f"train/{k}": logs[-1][k] for k in keys if logs and k in logs[-1]}

    def run(self) -> None:
        selfee, trainer = self.selfee, self.trainer
        if self.state.get("stopped"):
            LOG.warning(self._stopped_message())
            if self.state["completed"]:
                self.load_policy(max(self.state["completed"]))
            return
        planned = set(range(1, len(selfee.round_sizes) + 1))
        if self.state["completed"] and planned <= set(self.state["completed"]):
            LOG.info(f"selfee: every round in {self.root} is already finished; nothing to train")
            self.load_policy(max(self.state["completed"]))
            return
        seeded = trainer.train_dataset is not None and len(trainer.train_dataset) > 0
        if seeded:
            self.run_seed_round()
        else:
            LOG.info("selfee round 0 skipped: no seed pairs")
        chunks = trainer.prompt_pool.chunks(selfee.round_sizes) if selfee.round_sizes else []
        for round_idx, prompts in enumerate(chunks, start=1):
            if not self.run_round(round_idx, prompts):
                return
        LOG.info(f"selfee: all {len(chunks) + seeded} rounds finished; summary in {self.root / SUMMARY_FILE}")


def run_rounds(trainer, train_fn):
    """Entry point called from `SelfeeDPOTrainer.train`; returns the last round's TrainOutput (None if all resumed)."""
    runner = RoundRunner(trainer, train_fn)
    runner.run()
    return runner.last_output
