"""The SELFEE round loop: seed DPO, then generate -> judge -> noise-aware DPO per round, with resume.

Supports:
    - Round 0: DPO on the seed pairs from `pi_init` (plain sigmoid loss), `selfee.seed_epochs` epochs.
    - Rounds t >= 1: sample `samples_per_prompt` responses for the next unused chunk of the prompt pool from
      `pi_{t-1}`, judge them with r = log pi_{t-1} - log pi_init, train DPO from `pi_{t-1}` with reference
      `pi_{t-1}` (or `pi_init`, `selfee.dpo_reference: initial`) and the noise-aware loss.
    - LoRA/QLoRA: `pi_init` is the model with adapters disabled; `pi_{t-1}` is a frozen snapshot adapter named
      `ref` (TRL 1.9 uses it as the reference). Full fine-tuning keeps frozen copies.
    - Artifacts per round under `output_dir/selfee/round_<t>/` and resume from the last finished step of work.

Assumptions:
    - One process (no data or model parallelism across rounds' generation); the trainer is a SelfeeDPOTrainer.
    - The judged `log pi_{t-1}` values are the exact reference log-probs of round t's DPO, so with
      `refine.extrapolation == 0` training runs no reference forward pass.

Raises:
    ValueError: resuming with a config that changed what earlier rounds computed (base model, prompt pool,
        round sizes, samples per prompt, seed data).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path

from accelerate.utils import is_peft_model

from ._logging import get_logger

LOG = get_logger(__name__)

STATE_FILE = "state.json"
REF_ADAPTER = "ref"  # the name TRL 1.9's DPOTrainer looks for (trl/trainer/dpo_trainer.py, _compute_loss)


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)  # atomic: a kill never leaves half a metrics or state file


def _fire(trainer, event: str, **kwargs) -> None:
    """Round boundaries as callback events: any callback may define `on_selfee_round_begin/_end`."""
    for callback in trainer.callback_handler.callbacks:
        handler = getattr(callback, event, None)
        if handler is not None:
            handler(trainer.args, trainer.state, trainer.control, **kwargs)


def _fingerprint(trainer, selfee) -> dict:
    """What earlier rounds' results depend on; a resumed run must match it exactly."""
    cfg = trainer.axolotl_cfg
    pool = trainer.prompt_pool
    pool_hash = hashlib.sha256(json.dumps([pool.ids, pool.messages] if pool else []).encode()).hexdigest()[:16]
    return {
        "base_model": str(cfg.base_model),
        "lora_model_dir": str(cfg.lora_model_dir) if cfg.lora_model_dir else None,
        "adapter": str(cfg.adapter) if cfg.adapter else None,
        "seed_datasets": sorted(str(d.get("path")) for d in (cfg.datasets or [])),
        "prompt_pool": pool_hash,
        "round_sizes": selfee.round_sizes,
        "samples_per_prompt": selfee.samples_per_prompt,
    }


class RoundRunner:
    """Owns per-round state: references, datasets, schedules, artifacts and resume."""

    def __init__(self, trainer, train_fn):
        self.trainer = trainer
        self.train_fn = train_fn
        self.selfee = trainer.selfee
        self.model = trainer.model
        self.peft = is_peft_model(self.model)
        self.root = Path(trainer.args.output_dir) / "selfee"
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = self._load_state()
        self.judge_reference = self._init_judge_reference()
        self.last_output = None
        self._eval_rows = None  # judge.eval_pairs, loaded on first use

    # ---- state and resume -------------------------------------------------------------------------------

    def _load_state(self) -> dict:
        fingerprint = _fingerprint(self.trainer, self.selfee)
        path = self.root / STATE_FILE
        if path.exists():
            state = json.loads(path.read_text())
            old = state["fingerprint"]
            changed = {k: (old.get(k), v) for k, v in fingerprint.items() if old.get(k) != v}
            if changed:
                details = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
                raise ValueError(
                    f"{self.root} holds a SELFEE run with another configuration ({details}). Resuming would mix "
                    "incompatible rounds: restore the original settings, or use a new output_dir."
                )
            return state
        state = {"fingerprint": fingerprint, "completed": []}
        _write_json(path, state)
        return state

    def _mark_done(self, round_idx: int, metrics: dict) -> None:
        _write_json(self.round_dir(round_idx) / "metrics.json", metrics)
        self.state["completed"].append(round_idx)
        _write_json(self.root / STATE_FILE, self.state)

    def round_dir(self, round_idx: int) -> Path:
        path = self.root / f"round_{round_idx}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---- references ---------------------------------------------------------------------------------------

    def _init_judge_reference(self):
        """pi_init for the judge: a separate model, a frozen copy of a starting adapter, or adapters disabled."""
        if self.selfee.judge.reference_model:
            from transformers import AutoModelForCausalLM

            ref = AutoModelForCausalLM.from_pretrained(self.selfee.judge.reference_model, dtype=self.model.dtype)
            return ref.to(self.model.device).eval().requires_grad_(False)
        if not self.peft:
            return copy.deepcopy(self.trainer.accelerator.unwrap_model(self.model)).eval().requires_grad_(False)
        if REF_ADAPTER in self.model.peft_config:
            # TRL made `ref` a copy of a pretrained starting adapter (lora_model_dir): that adapter is pi_init, and
            # `ref` will be overwritten by later snapshots, so keep it under its own frozen name.
            self._copy_adapter(REF_ADAPTER, "selfee_init")
            return "selfee_init"
        return None  # a fresh adapter: disabling it gives pi_init

    def _copy_adapter(self, source: str, target: str) -> None:
        model = self.model
        if target not in model.peft_config:
            model.add_adapter(target, model.peft_config[source])
        for name, param in model.named_parameters():
            if f".{source}." in name:
                target_param = model.get_parameter(name.replace(f".{source}.", f".{target}."))
                target_param.data.copy_(param.data)
                target_param.requires_grad_(False)
        model.set_adapter("default")  # keep training the policy adapter; snapshots stay frozen

    def snapshot_reference(self) -> None:
        """Make the DPO reference of the next round pi_{t-1} (or keep pi_init with dpo_reference: initial)."""
        if self.selfee.dpo_reference == "initial":
            return
        if self.peft:
            self._copy_adapter("default", REF_ADAPTER)
        elif self.trainer.ref_model is not None:
            self.trainer.ref_model.load_state_dict(self.trainer.accelerator.unwrap_model(self.model).state_dict())

    # ---- per-round persistence of the policy ---------------------------------------------------------------

    def save_policy(self, round_idx: int) -> None:
        out = self.round_dir(round_idx) / ("adapter" if self.peft else "model")
        if self.peft:
            self.model.save_pretrained(str(out), selected_adapters=["default"])
        else:
            self.trainer.save_model(str(out))

    def load_policy(self, round_idx: int) -> None:
        src = self.round_dir(round_idx) / ("adapter" if self.peft else "model")
        if self.peft:
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            set_peft_model_state_dict(self.model, load_peft_weights(str(src)), adapter_name="default")
        else:
            from transformers import AutoModelForCausalLM

            state = AutoModelForCausalLM.from_pretrained(str(src), dtype=self.model.dtype).state_dict()
            self.trainer.accelerator.unwrap_model(self.model).load_state_dict(state)

    # ---- training one round ---------------------------------------------------------------------------------

    def _set_schedule(self, epochs: float) -> None:
        """A fresh optimizer and learning-rate schedule per round, as the paper's separate runs have."""
        args, cfg = self.trainer.args, self.trainer.axolotl_cfg
        args.num_train_epochs = epochs
        # Axolotl sets max_steps from the seed set's size; each round has its own size.
        args.max_steps = cfg.max_steps or -1
        if cfg.warmup_steps is None:
            # transformers 5 reads a warmup_steps below 1 as a ratio of each run's steps.
            args.warmup_steps = cfg.warmup_ratio if cfg.warmup_ratio is not None else 0.03
        self.trainer.optimizer = None
        self.trainer.lr_scheduler = None

    def _train(self, dataset, epochs: float, refine: bool) -> float:
        trainer = self.trainer
        trainer.train_dataset = dataset
        self._set_schedule(epochs)
        trainer.begin_round(refine=refine)
        start = time.monotonic()
        self.last_output = self.train_fn()
        return time.monotonic() - start

    def run_seed_round(self) -> None:
        trainer = self.trainer
        if 0 in self.state["completed"]:
            LOG.info("selfee round 0 (seed) already finished: loading its policy")
            self.load_policy(0)
            return
        _fire(trainer, "on_selfee_round_begin", round_idx=0)
        LOG.info(f"selfee round 0: DPO on {len(trainer.train_dataset)} seed pairs, {self.selfee.seed_epochs} epoch(s)")
        seconds = self._train(trainer.train_dataset, self.selfee.seed_epochs, refine=False)
        self.save_policy(0)
        metrics = {"selfee/round": 0, "selfee/pairs": len(trainer.train_dataset), "selfee/seconds_train": seconds}
        metrics.update(self._final_train_metrics())
        self._finish(0, metrics)

    def run_round(self, round_idx: int, prompts) -> None:
        from .annotate import annotate, load_judged_pairs

        trainer, selfee = self.trainer, self.selfee
        if round_idx in self.state["completed"]:
            LOG.info(f"selfee round {round_idx} already finished: loading its policy")
            self.load_policy(round_idx)
            return
        _fire(trainer, "on_selfee_round_begin", round_idx=round_idx)
        round_dir = self.round_dir(round_idx)
        LOG.info(f"selfee round {round_idx}: generating and judging {len(prompts)} prompts")
        metrics = {"selfee/round": round_idx}
        metrics.update(
            annotate(
                self.model,
                trainer.processing_class,
                prompts,
                selfee,
                beta=trainer.beta,
                out_path=str(round_dir / "pairs.jsonl"),
                reference=self.judge_reference,
                seed=selfee.generation.seed + round_idx,
                max_length=trainer.args.max_length,
            )
        )
        metrics.update(self.judge_accuracy())
        pairs = load_judged_pairs(str(round_dir / "pairs.jsonl"), reference=selfee.dpo_reference)
        metrics["selfee/pairs"] = len(pairs)
        if len(pairs) == 0:
            LOG.warning(f"selfee round {round_idx}: no usable pair was judged; the policy is left unchanged")
            self.save_policy(round_idx)
            self._finish(round_idx, metrics)
            return
        self.snapshot_reference()
        dataset = trainer._prepare_dataset(pairs, trainer.processing_class, trainer.args, f"selfee_round_{round_idx}")
        # The judged log pi_{t-1} are the reference log-probs: no reference forward pass when lambda == 0.
        trainer.precompute_ref_logps = selfee.refine.extrapolation == 0
        LOG.info(f"selfee round {round_idx}: DPO on {len(pairs)} judged pairs, {selfee.round_epochs} epoch(s)")
        metrics["selfee/seconds_train"] = self._train(dataset, selfee.round_epochs, refine=True)
        self.save_policy(round_idx)
        metrics.update(self._final_train_metrics())
        self._finish(round_idx, metrics)

    def judge_accuracy(self) -> dict:
        if not self.selfee.judge.eval_pairs:
            return {}
        from .judge import judge_accuracy, load_eval_pairs

        if self._eval_rows is None:
            self._eval_rows = load_eval_pairs(self.selfee.judge.eval_pairs, self.trainer.processing_class)
        rows = self._eval_rows
        accuracy = judge_accuracy(
            self.model, self.trainer.processing_class, rows, reference=self.judge_reference, beta=self.trainer.beta,
            batch_size=self.selfee.judge.batch_size, length_normalize=self.selfee.judge.length_normalize,
            max_length=self.trainer.args.max_length,
        )
        return {"selfee/judge_accuracy": accuracy, "selfee/judge_eval_pairs": len(rows)}

    def _final_train_metrics(self) -> dict:
        logs = [h for h in self.trainer.state.log_history if "loss" in h]
        keys = ("loss", "rewards/margins", "rewards/accuracies", "selfee/noisy_fraction", "selfee/threshold")
        return {f"train/{k}": logs[-1][k] for k in keys if logs and k in logs[-1]}

    def _finish(self, round_idx: int, metrics: dict) -> None:
        self._mark_done(round_idx, metrics)
        _write_json(self.root / "summary.json", self._all_metrics())
        _fire(self.trainer, "on_selfee_round_end", round_idx=round_idx, metrics=metrics)
        numeric = {k: v for k, v in metrics.items() if k.startswith("selfee/") and isinstance(v, (int, float))}
        # Through the trainer's log, so the round's metrics reach the user's trackers (wandb, tensorboard, ...).
        self.trainer.log({k: float(v) for k, v in numeric.items()})
        shown = {k.split("/", 1)[1]: round(v, 4) if isinstance(v, float) else v for k, v in numeric.items()}
        LOG.info(f"selfee round {round_idx} done: {shown}")

    def _all_metrics(self) -> list[dict]:
        rows = []
        for idx in sorted(self.state["completed"]):
            path = self.round_dir(idx) / "metrics.json"
            if path.exists():
                rows.append(json.loads(path.read_text()))
        return rows

    def run(self) -> None:
        selfee, trainer = self.selfee, self.trainer
        if set(range(1, len(selfee.round_sizes) + 1)) <= set(self.state["completed"]) and self.state["completed"]:
            LOG.info(f"selfee: every round in {self.root} is already finished; nothing to train")
            self.load_policy(max(self.state["completed"]))
            return
        if trainer.train_dataset is not None and len(trainer.train_dataset) > 0:
            self.run_seed_round()
        else:
            LOG.info("selfee round 0 skipped: no seed pairs")
        chunks = trainer.prompt_pool.chunks(selfee.round_sizes) if selfee.round_sizes else []
        for round_idx, prompts in enumerate(chunks, start=1):
            self.run_round(round_idx, prompts)
        LOG.info(f"selfee: all {len(chunks) + 1} rounds finished; summary in {self.root / 'summary.json'}")


def run_rounds(trainer, train_fn):
    """Entry point called from `SelfeeDPOTrainer.train`; returns the last round's TrainOutput (None if all resumed)."""
    runner = RoundRunner(trainer, train_fn)
    runner.run()
    return runner.last_output
