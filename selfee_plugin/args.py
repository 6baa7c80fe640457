"""The `selfee:` config block: options, paper defaults and validation, all checked before any model loads.

Its sub-blocks (`generation:`, `judge:`, ...) are in `config_blocks`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from .config_blocks import (
    ConfigBlock,
    GenerationConfig,
    GuardConfig,
    JudgeConfig,
    LabelsConfig,
    PromptDataset,
    RefineConfig,
)

# The DPO losses SPA's smoothing term is defined for (see `trainer.SelfeeDPOTrainer._check_refine_supported`).
REFINE_LOSS_TYPES = {"sigmoid", "sft"}


class SelfeeConfig(ConfigBlock):
    """SELFEE / SPA: seed DPO, then rounds of self-generated, self-judged, noise-aware DPO."""

    prompts: list[PromptDataset] | None = Field(
        default=None, description="The unlabelled prompt pool, split into one chunk per round in a fixed order."
    )
    rounds: int | list[int] = Field(
        default=[8000, 20000],
        description="Prompts per self-annotation round, e.g. [8000, 20000]; or a count of rounds with "
        "`prompts_per_round`. 0 or [] trains on the seed only.",
    )
    prompts_per_round: int | None = Field(
        default=None, gt=0, description="Prompts per round when `rounds` is a count."
    )
    samples_per_prompt: int = Field(default=2, ge=2, description="n: responses sampled per prompt.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Sampling settings.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="Judgment settings.")
    refine: RefineConfig = Field(default_factory=RefineConfig, description="Label refinement settings.")
    guard: GuardConfig = Field(default_factory=GuardConfig, description="Round guard settings.")
    labels: LabelsConfig = Field(default_factory=LabelsConfig, description="On-policy label check settings.")
    seed_epochs: float = Field(default=3.0, gt=0.0, description="Epochs of DPO on the seed pairs (round 0).")
    round_epochs: float = Field(default=1.0, gt=0.0, description="Epochs of DPO on each round's judged pairs.")
    round_learning_rate: float | None = Field(
        default=None, gt=0.0, description="Learning rate of rounds t >= 1; default: Axolotl's `learning_rate`, as the seed."
    )
    round_micro_batch_size: int | None = Field(
        default=None, gt=0,
        description="Pairs per device step in rounds t >= 1 (the reference code trains rounds at twice the seed's "
        "batch); default: Axolotl's `micro_batch_size`, as the seed.",
    )
    dpo_reference: Literal["previous", "initial"] = Field(
        default="previous",
        description="DPO reference of round t: `previous` (pi_{t-1}, the paper) or `initial` (pi_init).",
    )
    shuffle_seed: int = Field(default=42, description="Seed of the fixed shuffle of the prompt pool.")

    @field_validator("generation")
    @classmethod
    def _batch_size_positive(cls, generation):
        if isinstance(generation.batch_size, int) and generation.batch_size <= 0:
            raise ValueError(
                f"selfee.generation.batch_size is {generation.batch_size}; give a positive number of prompts or `auto`."
            )
        return generation

    @field_validator("rounds")
    @classmethod
    def _rounds_nonnegative(cls, rounds):
        if isinstance(rounds, int) and rounds < 0:
            raise ValueError(f"selfee.rounds is {rounds}; give a count >= 0 or a list of positive prompt counts.")
        if isinstance(rounds, list) and any(size <= 0 for size in rounds):
            raise ValueError(
                f"selfee.rounds is {rounds}; every round size must be a positive number of prompts, e.g. [8000, 20000]."
            )
        return rounds

    @model_validator(mode="after")
    def _check_rounds(self):
        if isinstance(self.rounds, int) and self.rounds > 0 and self.prompts_per_round is None:
            raise ValueError(
                f"selfee.rounds is a count ({self.rounds}), so selfee.prompts_per_round is required; "
                "or give rounds as a list of prompts per round, e.g. [8000, 20000]."
            )
        if isinstance(self.rounds, list) and self.prompts_per_round is not None:
            raise ValueError(
                "selfee.prompts_per_round is set but selfee.rounds is already a list of round sizes; "
                "remove one of them."
            )
        if self.dpo_reference == "initial" and self.judge.reference_model and self.refine.extrapolation > 0:
            raise ValueError(
                "selfee.dpo_reference: initial with selfee.judge.reference_model makes the reference model's log-probs "
                "the DPO reference columns, but selfee.refine.extrapolation > 0 computes reference logits from the "
                "policy's starting weights: the two would disagree. Set refine.extrapolation: 0, or dpo_reference: "
                "previous."
            )
        if self.round_sizes and not self.prompts:
            raise ValueError(
                f"selfee.prompts is empty but selfee.rounds asks for {len(self.round_sizes)} self-annotation round(s); "
                "add a prompt pool under selfee.prompts, or set selfee.rounds: 0 to train on the seed only."
            )
        return self

    @property
    def round_sizes(self) -> list[int]:
        """Prompts per self-annotation round, in order."""
        if isinstance(self.rounds, list):
            return list(self.rounds)
        return [self.prompts_per_round] * self.rounds if self.rounds else []


class SelfeeArgs(BaseModel):
    """Mixed into Axolotl's config: adds the `selfee:` block and its rules against top-level keys."""

    selfee: SelfeeConfig | None = Field(default=None, description="SELFEE self-annotation settings.")

    @model_validator(mode="before")
    @classmethod
    def _check_axolotl_keys(cls, data):
        if not isinstance(data, dict) or data.get("selfee") is None:
            return data
        rl = data.get("rl")
        rl = getattr(rl, "value", rl)
        if rl != "dpo":
            raise ValueError(
                f"selfee requires `rl: dpo` (got rl: {rl!r}); SELFEE trains DPO on its judged pairs. Set rl: dpo."
            )
        problems = []
        losses = data.get("dpo_loss_type") or ["sigmoid"]
        if not set(losses) <= REFINE_LOSS_TYPES or "sigmoid" not in losses:
            problems.append(f"dpo_loss_type: {losses} (allowed: [sigmoid], or [sigmoid, sft] with dpo_loss_weights)")
        for key in ("dpo_use_weighting", "dpo_use_liger_kernel"):
            if data.get(key):
                problems.append(f"{key}: {data[key]} (allowed: false)")
        if problems:
            raise ValueError(
                "selfee trains SPA's noise-aware loss, which is sigmoid DPO plus label smoothing of noisy pairs, so it "
                f"cannot run with {'; '.join(problems)}. Remove these keys; to train another preference loss on "
                "SELFEE's judged pairs, use them as a dataset (type: selfee_plugin.judged_pairs) without `selfee:`."
            )
        return data

    @model_validator(mode="before")
    @classmethod
    def check_dataset_or_pretraining_dataset(cls, data):
        """Replaces Axolotl's validator of this name, which requires `datasets:`, so that a `selfee:` run may have
        no seed pairs (round 0 skipped, `judge.reference_model` as pi_init; the plugin's `load_datasets` supplies
        the empty seed set). The override works because the plugin's mixin precedes Axolotl's validation mixins
        in the merged config class's MRO (tests/test_no_seed.py checks it); configs without `selfee:` or with
        seed pairs still get Axolotl's own check."""
        from axolotl.utils.schemas.validation import DatasetValidationMixin

        selfee = data.get("selfee") if isinstance(data, dict) else None
        if selfee is None or data.get("datasets"):
            return DatasetValidationMixin.check_dataset_or_pretraining_dataset(data)
        selfee = selfee if isinstance(selfee, dict) else {}
        judge = selfee.get("judge") or {}
        if not (isinstance(judge, dict) and judge.get("reference_model")):
            raise ValueError(
                "selfee has no seed preference pairs (`datasets:` is absent or empty), so "
                "selfee.judge.reference_model is required: with no seed round, the judge needs another model as "
                "pi_init (e.g. the base model your instruct model was tuned from). Set it, or add seed pairs under "
                "`datasets:`."
            )
        if selfee.get("rounds") in (0, []):
            raise ValueError(
                f"selfee has no seed preference pairs and selfee.rounds is {selfee['rounds']!r}: there is nothing to "
                "train. Ask for self-annotation rounds (e.g. rounds: [8000, 20000]), or add seed pairs under "
                "`datasets:`."
            )
        if judge.get("eval_pairs") == "auto":
            raise ValueError(
                "selfee.judge.eval_pairs: auto holds out a share of the seed pairs, but this run has none (`datasets:` "
                "is absent or empty). Give a held-out pairs file instead, e.g. {path: heldout_pairs.jsonl, ds_type: "
                "json, type: chat_template.default}, or remove judge.eval_pairs."
            )
        evaluation = [key for key in ("test_datasets", "val_set_size") if data.get(key)]
        if evaluation:
            raise ValueError(
                f"selfee has no seed preference pairs, so Axolotl's dataset loading, which builds the evaluation set "
                f"from test_datasets or a val_set_size share of `datasets:`, does not run: {' and '.join(evaluation)} "
                "would be ignored. Remove it; to measure the judge on held-out human pairs each round, use "
                "selfee.judge.eval_pairs."
            )
        # `datasets: []` means the same as no `datasets:` key; Axolotl's schema refuses an empty list.
        return {key: value for key, value in data.items() if key != "datasets"}


def parse_selfee(cfg) -> SelfeeConfig | None:
    """The validated `selfee:` block of an Axolotl cfg (Axolotl stores plugin blocks back as plain dicts)."""
    block = cfg.get("selfee") if hasattr(cfg, "get") else getattr(cfg, "selfee", None)
    if block is None or isinstance(block, SelfeeConfig):
        return block
    return SelfeeConfig.model_validate(dict(block))
