"""SelfeeDPOTrainer: Axolotl's DPO trainer plus the SELFEE round loop and SPA's noise-aware loss as an added term.

The loss is TRL 1.9's own `compute_loss` in every round (so every metric TRL logs keeps being logged), run with the
output layer's logits upcast to float32 (`logprobs.float32_logits`) so its log-softmax and sums take TRL's float32
path; refine rounds add SPA's smoothing of the noisy pairs as a linear term (`loss.linear_smoothing_term`).

Upstream internals this module relies on (read from TRL 1.9.0, transformers 5.16, Axolotl 0.19.0);
`tests/unit/test_trainer.py::test_upstream_contract` checks each, with its signature where it is a callable:

- `DPOTrainer._metrics` (private): `{"train"|"eval": defaultdict(list)}`; we append, TRL's `log()` averages.
- `DPOTrainer` attributes set in its `__init__` (public names, undocumented): `beta`, `ref_model`, `loss_types`,
  `loss_weights`, `ld_alpha`, `f_divergence_type`, `use_weighting`, `use_liger_kernel`, `precompute_ref_logps`.
- `DPOTrainer.compute_loss(model, inputs, return_outputs, num_items_in_batch)` returning `(loss, outputs)` with
  `outputs.logits` when `return_outputs`; `DPOTrainer._prepare_dataset(dataset, processing_class, args, dataset_name)`
  (private): tokenizes each round's judged pairs as TRL tokenizes any DPO dataset.
- `Trainer._save_optimizer_and_scheduler(output_dir)` / `Trainer._load_optimizer_and_scheduler(checkpoint)`
  (private): the one save/load pair that every backend (DeepSpeed included) calls with the checkpoint folder;
  we store the noise window beside the optimizer state there. `Trainer.callback_handler.callbacks`: round events.
  `Trainer._train_batch_size` (private): the per-device batch `get_train_dataloader` uses; `rounds.py` sets it per
  round (`selfee.round_micro_batch_size`).
- `trl.trainer.utils.use_adapter(model, adapter_name)`, `trl.trainer.utils.pad(tensors, padding_value, padding_side)`,
  `trl.models.utils.disable_gradient_checkpointing(model, gradient_checkpointing_kwargs)`,
  `trl.data_utils._tokenize(tokenizer, text)` (private; `formatting.py`): helpers not exported from `trl`.
- `axolotl.utils.collators.dpo.AxolotlDPODataCollatorWithPadding`: detected and replaced (see `_preference_collator`).
"""

from __future__ import annotations

import json
import os

import torch
from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
from axolotl.utils.collators.dpo import AxolotlDPODataCollatorWithPadding
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from typing_extensions import override

from . import metric_keys as keys
from ._logging import get_logger
from .args import REFINE_LOSS_TYPES
from .artifacts import NOISE_STATE_FILE
from .config_blocks import RefineConfig
from .context import RunContext
from .formatting import pad_token_id
from .logprobs import float32_logits, sequence_logps
from .loss import NoiseDetector, compute_extrapolated_logps, compute_margins, linear_smoothing_term
from .references import dpo_reference, reference_context
from .rounds import run_rounds

LOG = get_logger(__name__)

# Batch keys that are not model inputs (as in TRL's `_compute_loss`).
NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def _preference_collator(data_collator, args, processing_class):
    """Swap Axolotl's `pad_to_multiple_of` collator for TRL's preference collator with the same padding multiple.

    Axolotl 0.19 builds `AxolotlDPODataCollatorWithPadding` when `pad_to_multiple_of` is set. It keeps
    `ref_*_logps` but pads only the pre-TRL-1.0 keys (`prompt_input_ids`, `chosen_input_ids`, ...): TRL 1.9
    tokenizes to `prompt_ids`/`chosen_ids`/`rejected_ids`, which it passes through as lists, so the batch has no
    `input_ids` or `completion_mask`. TRL's `DataCollatorForPreference` pads to a multiple too and keeps both
    reference columns.
    """
    if not isinstance(data_collator, AxolotlDPODataCollatorWithPadding):
        return data_collator
    pad_id = data_collator.pad_token_id
    if pad_id is None and processing_class is not None:
        pad_id = pad_token_id(getattr(processing_class, "tokenizer", processing_class))
    LOG.info(
        f"selfee: using TRL's DataCollatorForPreference (pad_to_multiple_of={data_collator.pad_to_multiple_of}) "
        "instead of AxolotlDPODataCollatorWithPadding, which does not build TRL 1.9's input_ids/completion_mask."
    )
    return DataCollatorForPreference(
        pad_token_id=pad_id,
        max_length=getattr(args, "max_length", None),
        truncation_mode=getattr(args, "truncation_mode", "keep_start"),
        pad_to_multiple_of=data_collator.pad_to_multiple_of,
    )


class SelfeeDPOTrainer(AxolotlDPOTrainer):
    """DPO trainer that runs every SELFEE round when Axolotl calls `train()`.

    Refinement is off after `__init__`: the loss is TRL's own (round 0, the seed). The round loop calls
    `begin_round(refine=True)` before each self-labelled round's `train()`; the loss is then the noise-aware DPO
    loss of `selfee_plugin.loss`.
    """

    tag_names = ["axolotl", "dpo", "selfee"]

    def __init__(self, *args, run_context: RunContext | None = None, **kwargs):
        """Args: as AxolotlDPOTrainer's, plus `run_context`: the run as the plugin prepared it before the model loaded
        (`context.RunContext`, after `data_checks.preflight`); None trains plain DPO with TRL's loss."""
        kwargs["data_collator"] = _preference_collator(
            kwargs.get("data_collator"), kwargs.get("args"), kwargs.get("processing_class")
        )
        super().__init__(*args, **kwargs)
        self.run_context = run_context
        self.selfee = run_context.selfee if run_context is not None else None
        self.refine = self.selfee.refine if self.selfee is not None else RefineConfig()
        self.noise_detector = NoiseDetector(window=self.refine.window, noisy_fraction=self.refine.noisy_fraction)
        self.refine_enabled = False
        if self.selfee is not None and self.selfee.round_sizes:
            self._check_refine_supported()  # before the seed round trains, not after it

    @override
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Run every SELFEE round (round 0 on the seed, then the self-annotation rounds); see `rounds.py`."""
        if resume_from_checkpoint:
            # Resume is per round (finished rounds and judged pairs under output_dir/selfee), not per HF checkpoint:
            # a checkpoint belongs to one round's schedule and cannot restart the whole loop.
            LOG.warning(f"selfee resumes from output_dir/selfee, not from the checkpoint {resume_from_checkpoint}")
        return run_rounds(self, lambda: super(SelfeeDPOTrainer, self).train(*args, **kwargs))

    def begin_round(self, refine: bool) -> None:
        """Start a round: empty the noise window and choose the loss (TRL's DPO, or noise-aware when `refine`).

        Call before each round's `train()`, after swapping `train_dataset`; on resume, call it before
        `train(resume_from_checkpoint=...)`, which then restores the window saved with the checkpoint.

        Raises:
            ValueError: `refine` with a DPO setting the noise-aware loss does not implement.
        """
        if refine:
            self._check_refine_supported()
            # Judged rounds carry log pi_{t-1} as `ref_*_logps` columns: TRL then runs no reference forward.
            columns = getattr(self.train_dataset, "column_names", None) or []
            self.precompute_ref_logps = {"ref_chosen_logps", "ref_rejected_logps"} <= set(columns)
        # The margins' scale changes with each round's reference, so last round's window says nothing about this one.
        self.noise_detector.reset()
        self.refine_enabled = refine

    def _check_refine_supported(self) -> None:
        unsupported = [
            (not set(self.loss_types) <= REFINE_LOSS_TYPES or "sigmoid" not in self.loss_types,
             f"loss_type {self.loss_types} (supported: sigmoid, optionally with sft)"),
            (self.f_divergence_type != "reverse_kl", f"f_divergence_type {self.f_divergence_type!r}"),
            (self.ld_alpha is not None, f"ld_alpha {self.ld_alpha}"),
            (self.use_weighting, "use_weighting"),
            (self.use_liger_kernel, "use_liger_kernel"),
        ]
        found = [what for bad, what in unsupported if bad]
        if found:
            raise ValueError(
                "selfee's noise-aware loss is plain sigmoid DPO with label smoothing; it cannot run with "
                f"{', '.join(found)}. Remove these DPO options for a selfee run."
            )

    @override
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's DPO loss on float32 logits; in refine rounds plus SPA's smoothing of the pairs flagged as noisy."""
        with float32_logits(self.accelerator.unwrap_model(model)), float32_logits(self.ref_model):
            if not self.refine_enabled:
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=None)
            loss = loss + self._smoothing_term(model, inputs, outputs.logits[:, :-1])
        return (loss, outputs) if return_outputs else loss

    def _smoothing_active(self) -> bool:
        # SPA: no smoothing during the first warmup_ratio of the round's steps; each round's train() restarts the count.
        max_steps = self.state.max_steps
        progress = self.state.global_step / max_steps if max_steps > 0 else 1.0
        return self.refine.smoothing > 0 and progress >= self.refine.warmup_ratio

    @torch.no_grad()
    def _reference_logits(self, model, inputs) -> torch.Tensor:
        """(2B, T, V) logits of the DPO reference, the one TRL would use (see `references.dpo_reference`)."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            with reference_context(self.accelerator.unwrap_model(model), dpo_reference(self)) as reference:
                return reference(**model_kwargs).logits

    def _smoothing_term(self, model, inputs, shift_logits: torch.Tensor) -> torch.Tensor:
        """SPA Eq. 9 as what it adds to TRL's sigmoid loss: -(1-a) logsig(x) - a logsig(-x) = -logsig(x) + a x.

        Detection (SPA Eq. 8) runs on the detached extrapolated margins beta * z~ against the rolling threshold; the
        gradient-carrying term a * beta * z is computed only on the pairs flagged as noisy. The reference log-probs
        are the batch's judged `ref_*_logps` columns (the round loop always has them), else a reference forward.
        """
        mode = "train" if self.model.training else "eval"
        labels, mask = inputs["input_ids"][:, 1:], inputs["completion_mask"][:, 1:]
        has_columns = "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs
        with torch.no_grad():
            ref_logits = None
            if self.refine.extrapolation > 0 or not has_columns:
                ref_logits = self._reference_logits(model, inputs)[:, :-1]
            if has_columns:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"].float(), inputs["ref_rejected_logps"].float()
            else:  # outside the round loop (no judged columns): TRL ran its own reference forward too
                ref_chosen, ref_rejected = sequence_logps(ref_logits, labels, mask).chunk(2)
            if self.refine.extrapolation > 0:
                ext_logps = compute_extrapolated_logps(shift_logits, ref_logits, labels, mask, self.refine.extrapolation)
            else:  # lambda = 0: pi~ = pi_theta
                ext_logps = sequence_logps(shift_logits.detach(), labels, mask)
            del ref_logits
            ext_chosen, ext_rejected = ext_logps.chunk(2)  # (2B,) -> (B,), (B,)
            scores = self.beta * compute_margins(ext_chosen, ext_rejected, ref_chosen, ref_rejected)
            if mode == "train":
                noisy, tau = self.noise_detector.update(scores, gather=self.accelerator.gather)
            else:  # evaluation reads the training window without adding to it
                noisy, tau = self.noise_detector.flag(scores), self.noise_detector.threshold()

        active = self._smoothing_active()
        term = shift_logits.new_zeros((), dtype=torch.float32)
        flagged = noisy.nonzero()[:, 0]
        if active and len(flagged):
            half = len(ref_chosen)
            rows = torch.cat([flagged, flagged + half])  # chosen and rejected rows of the noisy pairs
            chosen_logps, rejected_logps = sequence_logps(shift_logits[rows], labels[rows], mask[rows]).chunk(2)
            z = compute_margins(chosen_logps, rejected_logps, ref_chosen[flagged], ref_rejected[flagged])
            weight = self.loss_weights[self.loss_types.index("sigmoid")]
            term = linear_smoothing_term(self.beta * z, self.refine.smoothing).sum() / half * weight

        gather, metrics = self.accelerator.gather, self._metrics[mode]
        metrics[keys.NOISY_FRACTION].append(gather(noisy.float()).mean().item())
        if tau is not None:
            metrics[keys.THRESHOLD].append(tau)
        metrics[keys.SMOOTHING_ACTIVE].append(float(active))
        metrics[keys.EXTRAPOLATED_MARGIN].append(gather(scores.float()).mean().item())
        return term

    @override
    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            with open(os.path.join(output_dir, NOISE_STATE_FILE), "w") as f:
                json.dump({"refine_enabled": self.refine_enabled, **self.noise_detector.state_dict()}, f)

    @override
    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, NOISE_STATE_FILE) if checkpoint else None
        if path and os.path.isfile(path):
            with open(path) as f:
                self.noise_detector.load_state_dict(json.load(f))
            LOG.info(f"selfee: restored {len(self.noise_detector.values)} noise-window values from {checkpoint}")
