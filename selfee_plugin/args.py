"""The `selfee:` config block: options, paper defaults and validation, all checked before any model loads."""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


# A hub id ("org/name" or "name"); anything else that is not on disk is a missing local path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt")
REFINE_LOSS_TYPES = {"sigmoid", "sft"}
# `generation.batch_size: auto`: sequences per batch on CPU (amortises per-step overhead, small enough for RAM), and
# the most on an accelerator (a decode step reads every weight once whatever the batch; larger was not measured).
CPU_AUTO_SEQUENCES = 64
AUTO_MAX_SEQUENCES = 256
# `judge.eval_pairs: auto`: the share of the seed pairs held out of round 0 to measure the judge each round.
AUTO_EVAL_SHARE = 0.1


def _missing_local_path(path: str, is_file_type: bool = False) -> bool:
    if os.path.exists(path):
        return False
    looks_local = path.startswith(("/", ".", "~")) or path.endswith(DATA_SUFFIXES) or is_file_type
    return looks_local or not HUB_ID.match(path)


class _Block(BaseModel):
    # A typo in a key must be an error, not a silently ignored option.
    model_config = ConfigDict(extra="forbid")


class PromptDataset(_Block):
    """One entry of the unlabelled prompt pool: an Axolotl dataset entry plus a prompt-extraction type."""

    path: str = Field(description="Local path, hub id or URL of the dataset, as in Axolotl's `datasets:` entries.")
    type: Literal["messages", "prompt", "ultrafeedback"] = Field(
        default="messages",
        description="How to extract the prompt: `messages` (a chat list; a trailing assistant turn is dropped), "
        "`prompt` (a plain string field, sent as one user turn), `ultrafeedback` (`prompt`, or `chosen` minus "
        "its last turn).",
    )
    split: str = Field(default="train", description="Dataset split to read.")
    name: str | None = Field(default=None, description="Dataset configuration name.")
    data_files: str | list[str] | None = Field(default=None, description="Files to load from `path`.")
    ds_type: str | None = Field(default=None, description="Loader type for local files (json, csv, parquet, ...).")
    revision: str | None = Field(default=None, description="Dataset revision on the hub.")
    field_messages: str = Field(default="messages", description="Field holding the chat list (type `messages`).")
    field_prompt: str = Field(
        default="prompt", description="Field holding the prompt (types `prompt`, `ultrafeedback`)."
    )
    field_chosen: str = Field(default="chosen", description="Field holding the chosen chat (type `ultrafeedback`).")
    field_system: str | None = Field(
        default=None, description="Optional field with a system prompt prepended to each prompt."
    )


class GenerationConfig(_Block):
    """Sampling of new responses from the current policy (SPA section 4.1)."""

    max_new_tokens: int = Field(default=300, gt=0, description="Most tokens generated per response.")
    temperature: float = Field(default=0.7, gt=0.0, description="Sampling temperature.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    batch_size: int | Literal["auto"] = Field(
        default="auto",
        description="Prompts per generate() call. `auto`: on an accelerator the most whose KV cache and sampling "
        f"buffers fit the free memory with a margin (at most {AUTO_MAX_SEQUENCES} sequences), on CPU "
        f"{CPU_AUTO_SEQUENCES} sequences. An out-of-memory error halves it and retries the same prompts.",
    )
    chunk_size: int = Field(
        default=512, gt=0, description="Prompts generated and judged per resumable chunk: each chunk's rows are "
        "written before the next starts, so a crash loses at most one chunk."
    )
    merge_adapter: bool | Literal["auto"] = Field(
        default="auto",
        description="Sample from a temporary copy with the LoRA merged (QLoRA: dequantized base + LoRA in the compute "
        "dtype), freed before judging; never changes the trained or judging weights. `auto`: on an accelerator when "
        "the copy fits beside the generation batch; never on CPU.",
    )
    backend: Literal["hf"] = Field(
        default="hf", description="Generation backend (`generation.SAMPLERS`); `hf` is transformers' generate."
    )
    max_prompt_length: int = Field(
        default=1024, gt=0, description="Prompts longer than this many tokens are skipped and counted, never truncated."
    )
    seed: int = Field(default=42, description="Seed for sampling; round t uses seed + t.")


class JudgeConfig(_Block):
    """Direct preference judgment with the implicit reward r = log pi_cur - log pi_ref (SPA Eq. 3-4)."""

    pairing: Literal["best_worst", "best_random"] = Field(
        default="best_worst",
        description="With more than 2 samples, pair the best response with the worst or with a random other one.",
    )
    length_normalize: bool = Field(
        default=False, description="Use the per-token mean of the log-ratio instead of its sum (length-bias control)."
    )
    reference_model: str | None = Field(
        default=None,
        description="Model whose log-probs replace pi_init in the judge (required when there is no seed data).",
    )
    eval_pairs: dict[str, Any] | Literal["auto"] | None = Field(
        default=None,
        description="Held-out human-labelled pairs (an Axolotl DPO dataset entry) to measure judge accuracy "
        f"each round; `auto`: hold out {AUTO_EVAL_SHARE:.0%} of the seed pairs (not trained on) for it.",
    )
    batch_tokens: int = Field(
        default=8192, gt=0, description="Padded tokens per judgment forward pass (sequences batched longest first)."
    )
    share_prompts: bool = Field(
        default=False,
        description="Forward each prompt once for all of its answers, on its cached keys and values (CPU, 4-layer "
        "bf16 QLoRA model: judgment 1.25x faster with 150-token prompts, 1.9x with 1,000). Exact up to float error, "
        "but in half precision the judged log-probs then differ from DPO training's full forward by rounding "
        "(~6e-5 of a sum), where a full forward batched differently can differ by none; off by default.",
    )
    length_bias_warning: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description="Warn when more than this share of unequal-length pairs chose the longer response.",
    )


    @field_validator("eval_pairs")
    @classmethod
    def _eval_pairs_exist(cls, entry):
        if entry is None or entry == "auto":
            return entry
        path = entry.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError(
                f"selfee.judge.eval_pairs needs a `path` (got {entry!r}); e.g. "
                "{path: heldout_pairs.jsonl, ds_type: json, type: chat_template.default}."
            )
        if _missing_local_path(path, bool(entry.get("ds_type") or entry.get("data_files"))):
            raise ValueError(
                f"selfee.judge.eval_pairs.path {path!r} does not exist (and is not a hub dataset id); give the path "
                "of a held-out human-labelled pairs file, or remove judge.eval_pairs."
            )
        return entry

    @field_validator("reference_model")
    @classmethod
    def _reference_model_exists(cls, path):
        if path is not None and _missing_local_path(path):
            raise ValueError(
                f"selfee.judge.reference_model {path!r} is neither a local model directory nor a hub id (org/name); "
                "give the directory of a saved model (config.json + weights) or a hub id."
            )
        return path


class RefineConfig(_Block):
    """Self-refinement of the judged labels (SPA Eq. 7-9)."""

    noisy_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="K: share of pairs with the lowest margins treated as noisy."
    )
    smoothing: float = Field(
        default=0.1, ge=0.0, lt=0.5, description="alpha: label smoothing applied to noisy pairs only."
    )
    extrapolation: float = Field(
        default=0.0,
        ge=0.0,
        description="lambda: de-coupled noise detection extrapolates logits (1+lambda)*h_theta - lambda*h_ref.",
    )
    window: int = Field(default=50, ge=1, description="W: how many recent margins set the noise threshold.")
    warmup_ratio: float = Field(
        default=0.2, ge=0.0, le=1.0, description="Share of each round's first steps trained without smoothing."
    )


class GuardConfig(_Block):
    """The round guard: after a round's training, undo it when gold-free signals show harm (README "Round guard")."""

    enabled: bool = Field(default=True, description="Check every round t >= 1 after its training.")
    min_chosen_drift: float = Field(
        default=0.0,
        description="Fire when the policy's log-probs on the round's chosen answers fell by more than this many "
        "nats per token during the round (`selfee/logps_drift_chosen_per_token` below it).",
    )
    max_drift_ratio: float = Field(
        default=3.0, gt=0.0,
        description="Fire when the round's chosen answers' log-probs rose but its rejected answers' fell more than "
        "this many times as far, per token (`selfee/logps_drift_ratio`).",
    )
    max_length_growth: float = Field(
        default=0.25, ge=0.0,
        description="Fire when answers sampled after the round (`probe_prompts` of its prompts) are longer than the "
        "round's own samples of the same prompts by more than this share, while the judge chose the longer answer "
        "in most (of >= 10) unequal-length pairs.",
    )
    min_on_policy_accuracy: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Fire when the judge agrees with `selfee.labels` on fewer than this share of labelled pairs.",
    )
    probe_prompts: int = Field(
        default=64, ge=0, description="Prompts of the round re-sampled after training to measure length growth (0: off)."
    )
    lr_scale: float = Field(
        default=0.5, gt=0.0, lt=1.0,
        description="The retry's learning rate, as a share of the round's; when the judge leaned to longer answers the "
        "retry also trains on length-balanced pairs.",
    )


class LabelsConfig(_Block):
    """On-policy label check: a few of each round's own pairs labelled by a person or a function (beyond the paper)."""

    per_round: float = Field(
        default=0, ge=0,
        description="Pairs to label per round: a share of the round's prompts (< 1) or a count (>= 1); 0: off. The "
        "judge's least sure pairs are exported, unequal-length pairs first.",
    )
    function: str | None = Field(
        default=None,
        description="`module.path:callable` labelling (messages, chosen, rejected) -> `chosen` | `rejected` | `tie`; "
        "without it the run stops and asks for labels in `round_<t>/to_label.jsonl`.",
    )

    @field_validator("function")
    @classmethod
    def _callable_path(cls, function):
        if function is not None and (function.count(":") != 1 or not all(function.split(":"))):
            raise ValueError(
                f"selfee.labels.function is {function!r}; give `module.path:callable`, e.g. selfee_demo.task:gold_label."
            )
        return function


class SelfeeConfig(_Block):
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
