"""SelfeeDPOTrainer: Axolotl's DPO trainer plus the SELFEE round loop and the noise-aware loss.

Upstream internals this module relies on (read from TRL 1.9.0, transformers 5.16, Axolotl 0.19.0);
`tests/test_trainer.py::test_upstream_contract` checks that each still exists on a real trainer:

- `DPOTrainer._metrics` (private): `{"train"|"eval": defaultdict(list)}`; we append, TRL's `log()` averages.
- `DPOTrainer` attributes set in its `__init__` (public names, undocumented): `beta`, `ref_model`, `loss_types`,
  `loss_weights`, `ld_alpha`, `f_divergence_type`, `use_weighting`, `use_liger_kernel`, `aux_loss_enabled`,
  `router_aux_loss_coef`.
- `Trainer._save_optimizer_and_scheduler(output_dir)` / `Trainer._load_optimizer_and_scheduler(checkpoint)`
  (private): the one save/load pair that every backend (DeepSpeed included) calls with the checkpoint folder;
  we store the noise window beside the optimizer state there.
- `trl.trainer.utils.use_adapter`, `trl.trainer.utils.selective_log_softmax`,
  `trl.models.utils.disable_gradient_checkpointing`: helpers not exported from `trl`.
- `axolotl.utils.collators.dpo.AxolotlDPODataCollatorWithPadding`: detected and replaced (see `_preference_collator`).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
from axolotl.utils.collators.dpo import AxolotlDPODataCollatorWithPadding
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import selective_log_softmax, use_adapter
from typing_extensions import override

from ._logging import get_logger
from .args import RefineConfig, parse_selfee
from .loss import NoiseDetector, compute_extrapolated_logps, compute_margins, noise_aware_dpo_loss

LOG = get_logger(__name__)

NOISE_STATE_NAME = "selfee_noise_state.json"
# Batch keys that are not model inputs (as in TRL's `_compute_loss`).
NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
REFINE_LOSS_TYPES = {"sigmoid", "sft"}


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
    pad_token_id = data_collator.pad_token_id
    if pad_token_id is None and processing_class is not None:
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    LOG.info(
        f"selfee: using TRL's DataCollatorForPreference (pad_to_multiple_of={data_collator.pad_to_multiple_of}) "
        "instead of AxolotlDPODataCollatorWithPadding, which does not build TRL 1.9's input_ids/completion_mask."
    )
    return DataCollatorForPreference(
        pad_token_id=pad_token_id,
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

    def __init__(self, *args, selfee_cfg=None, **kwargs):
        kwargs["data_collator"] = _preference_collator(
            kwargs.get("data_collator"), kwargs.get("args"), kwargs.get("processing_class")
        )
        super().__init__(*args, **kwargs)
        self.axolotl_cfg = selfee_cfg
        # Axolotl hands plugins its validated config with the `selfee:` block dumped back to plain dicts.
        self.selfee = parse_selfee(selfee_cfg) if selfee_cfg is not None else None
        self.prompt_pool = None  # set by SelfeePlugin.post_trainer_create
        self.refine = self.selfee.refine if self.selfee is not None else RefineConfig()
        self.noise_detector = NoiseDetector(window=self.refine.window, noisy_fraction=self.refine.noisy_fraction)
        self.refine_enabled = False

    @override
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Run every SELFEE round (round 0 on the seed, then the self-annotation rounds); see `rounds.py`."""
        from .rounds import run_rounds

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
        if not self.refine_enabled:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        return self._noise_aware_loss(model, inputs, return_outputs)

    def _smoothing_active(self) -> bool:
        # SPA: no smoothing during the first warmup_ratio of the round's steps; each round's train() restarts the count.
        max_steps = self.state.max_steps
        progress = self.state.global_step / max_steps if max_steps > 0 else 1.0
        return self.refine.smoothing > 0 and progress >= self.refine.warmup_ratio

    def _reference_logits(self, model, model_kwargs) -> torch.Tensor:
        """(2B, T, V) logits of the DPO reference, chosen as TRL does: the `ref` adapter, adapters off, or ref_model."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            unwrapped = self.accelerator.unwrap_model(model)
            if self.ref_model is None and is_peft_model(unwrapped):
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    return self.model(**model_kwargs).logits
            if self.ref_model is None:
                raise ValueError(
                    "selfee needs reference logits (no ref_chosen_logps/ref_rejected_logps columns, or "
                    "refine.extrapolation > 0), but this full fine-tuning run keeps no reference model."
                )
            return self.ref_model(**model_kwargs).logits

    def _noise_aware_loss(self, model, inputs, return_outputs):
        """SPA's self-refined DPO loss on one `[chosen; rejected]` batch.

        Reference log-probs: the batch's `ref_chosen_logps`/`ref_rejected_logps` when present (the judged
        log pi_{t-1}); otherwise one no-grad reference forward. That forward also runs when lambda > 0, since z~ needs
        reference logits; with columns present and lambda = 0 there is no reference forward at all.
        """
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        outputs = model(**model_kwargs)

        shift_logits = outputs.logits[:, :-1, :]  # (2B, T-1, V) predicts shift_labels
        shift_labels = inputs["input_ids"][:, 1:]
        shift_mask = inputs["completion_mask"][:, 1:]
        per_token_logps = selective_log_softmax(shift_logits, shift_labels)
        per_token_logps[shift_mask == 0] = 0.0
        chosen_logps, rejected_logps = per_token_logps.sum(dim=1).chunk(2, dim=0)  # (2B,) -> (B,), (B,)

        extrapolation = self.refine.extrapolation
        has_ref_columns = "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs
        ref_shift_logits = None
        # The judged log pi_{t-1} arrive as columns; with lambda = 0 nothing else needs the reference model.
        if extrapolation > 0 or not has_ref_columns:
            ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
            ref_shift_logits = self._reference_logits(model, ref_kwargs)[:, :-1, :]
        if has_ref_columns:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_per_token_logps = selective_log_softmax(ref_shift_logits, shift_labels)
            ref_per_token_logps[shift_mask == 0] = 0.0
            ref_chosen_logps, ref_rejected_logps = ref_per_token_logps.sum(dim=1).chunk(2, dim=0)

        # SPA Eq. 8: de-coupled detection on the extrapolated policy; lambda = 0 gives pi~ = pi_theta.
        if extrapolation > 0:
            ext_logps = compute_extrapolated_logps(
                shift_logits, ref_shift_logits, shift_labels, shift_mask, extrapolation
            )
            ext_chosen_logps, ext_rejected_logps = ext_logps.chunk(2, dim=0)  # (2B,) -> (B,), (B,)
        else:
            ext_chosen_logps, ext_rejected_logps = chosen_logps.detach(), rejected_logps.detach()
        del ref_shift_logits
        ext_scores = self.beta * compute_margins(
            ext_chosen_logps, ext_rejected_logps, ref_chosen_logps.detach(), ref_rejected_logps.detach()
        )
        if mode == "train":
            noisy, tau = self.noise_detector.update(ext_scores, gather=self.accelerator.gather)
        else:  # evaluation reads the training window without adding to it
            noisy, tau = self.noise_detector.flag(ext_scores), self.noise_detector.threshold()

        smoothing_active = self._smoothing_active()
        per_pair_loss = noise_aware_dpo_loss(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
            noisy, self.beta, self.refine.smoothing if smoothing_active else 0.0,
        )
        # Same accumulation as TRL's `_compute_loss`, so alpha = 0 reproduces its loss bit for bit.
        loss = 0.0
        for loss_type, loss_weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sigmoid":
                loss += per_pair_loss.mean() * loss_weight
            else:  # "sft" (checked in begin_round): NLL of the chosen completions, as TRL computes it
                half = len(shift_mask) // 2
                chosen_mask = shift_mask[:half].bool()
                sft_loss = F.cross_entropy(shift_logits[:half][chosen_mask], shift_labels[:half][chosen_mask])
                loss += sft_loss * loss_weight
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather(outputs.aux_loss.detach()).mean().item())

        self._log_refine_metrics(
            mode, shift_logits, shift_mask, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
            ext_scores, noisy, tau, smoothing_active,
        )
        return (loss, outputs) if return_outputs else loss

    def _log_refine_metrics(
        self, mode, shift_logits, shift_mask, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
        ext_scores, noisy, tau, smoothing_active,
    ) -> None:
        """Append TRL's reward/logp/logit metrics and the selfee/ detection metrics, gathered over processes."""
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        chosen_rewards = self.beta * (chosen_logps - ref_chosen_logps).detach()
        rejected_rewards = self.beta * (rejected_logps - ref_rejected_logps).detach()
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())

        # Mean logit over the vocabulary, averaged over completion tokens (TRL's logits/* definition).
        with torch.no_grad():
            halves = zip(("chosen", "rejected"), shift_logits.chunk(2, dim=0), shift_mask.chunk(2, dim=0))
            for name, logits, mask in halves:
                mask = mask.bool()
                total = gather(logits[mask].mean(-1).sum().float().reshape(1)).sum()
                count = gather(mask.sum().reshape(1)).sum()
                metrics[f"logits/{name}"].append((total / count).item() if count > 0 else 0.0)

        metrics["selfee/noisy_fraction"].append(gather(noisy.float()).mean().item())
        if tau is not None:
            metrics["selfee/threshold"].append(tau)
        metrics["selfee/smoothing_active"].append(float(smoothing_active))
        metrics["selfee/extrapolated_margin"].append(gather(ext_scores.float()).mean().item())

    @override
    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            with open(os.path.join(output_dir, NOISE_STATE_NAME), "w") as f:
                json.dump({"refine_enabled": self.refine_enabled, **self.noise_detector.state_dict()}, f)

    @override
    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, NOISE_STATE_NAME) if checkpoint else None
        if path and os.path.isfile(path):
            with open(path) as f:
                self.noise_detector.load_state_dict(json.load(f))
            LOG.info(f"selfee: restored {len(self.noise_detector.values)} noise-window values from {checkpoint}")
