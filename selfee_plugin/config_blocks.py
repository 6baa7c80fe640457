"""The sub-blocks of the `selfee:` config (prompt pool, generation, judge, refine, guard, labels) and their defaults."""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A hub id ("org/name" or "name"); anything else that is not on disk is a missing local path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt")
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


class ConfigBlock(BaseModel):
    # A typo in a key must be an error, not a silently ignored option.
    model_config = ConfigDict(extra="forbid")


class PromptDataset(ConfigBlock):
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


class GenerationConfig(ConfigBlock):
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


class JudgeConfig(ConfigBlock):
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
        description="Forward each prompt once for all of its answers, on its cached keys and values: faster "
        "judgment, the more so the longer the prompts. Exact up to float error, but in half precision the judged "
        "log-probs then differ by rounding from DPO training's full forward, which a full forward batched "
        "differently can match exactly; off by default.",
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


class RefineConfig(ConfigBlock):
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


class GuardConfig(ConfigBlock):
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


class LabelsConfig(ConfigBlock):
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
