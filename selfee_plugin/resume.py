"""Resume: the fingerprint of everything a finished round's result depends on, and the check a rerun must pass.

Excluded on purpose (throughput, not results): `generation.batch_size`, `generation.chunk_size`,
`generation.merge_adapter`, `judge.batch_tokens`, logging and saving settings. `selfee.rounds` may grow by appended
rounds (`[8000, 20000]` -> `[8000, 20000, 20000]`): finished rounds are kept and only the new ones train.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum

from pydantic import BaseModel

from .artifacts import STATE_FILE, selfee_root, write_json

# Top-level Axolotl keys that change what a round trains or judges.
AXOLOTL_KEYS = (
    "base_model", "base_model_config", "revision_of_model", "tokenizer_config", "lora_model_dir", "adapter",
    "load_in_4bit", "load_in_8bit", "bf16", "fp16", "tf32", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "lora_target_linear", "lora_modules_to_save", "peft_use_dora", "peft_use_rslora",
    "chat_template", "chat_template_jinja", "default_system_message", "rl", "rl_beta", "dpo_loss_type",
    "dpo_loss_weights", "dpo_label_smoothing", "rpo_alpha", "sequence_len", "learning_rate", "lr_scheduler",
    "warmup_ratio", "warmup_steps", "weight_decay", "optimizer", "micro_batch_size", "gradient_accumulation_steps",
    "max_grad_norm", "max_steps", "seed",
)
# Keys inside `selfee:` that only change speed or bookkeeping.
THROUGHPUT_KEYS = {("generation", "batch_size"), ("generation", "chunk_size"), ("generation", "merge_adapter"),
                   ("judge", "batch_tokens")}


def _plain(value):
    """JSON-comparable form of a config value (enums, DictDefault, pydantic models)."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def fingerprint(cfg, selfee, pool) -> dict:
    """Flat `key -> value` of what earlier rounds' results depend on (`selfee.*` keys dotted)."""
    out = {key: _plain(cfg.get(key)) for key in AXOLOTL_KEYS}
    out["datasets"] = _plain(cfg.get("datasets") or [])
    block = selfee.model_dump()
    block.pop("rounds", None)
    block.pop("prompts_per_round", None)
    for section in ("generation", "judge", "refine"):
        for key, value in block.pop(section).items():
            if (section, key) not in THROUGHPUT_KEYS:
                out[f"selfee.{section}.{key}"] = _plain(value)
    out.update({f"selfee.{key}": _plain(value) for key, value in block.items()})
    ids_messages = json.dumps([pool.ids, pool.messages] if pool else [])
    out["selfee.prompt_pool_sha256"] = hashlib.sha256(ids_messages.encode()).hexdigest()[:16]
    out["selfee.round_sizes"] = selfee.round_sizes
    return out


def check_resume(cfg, selfee, pool) -> dict:
    """The run's state: new when `output_dir/selfee` holds none, else the stored one if it matches.

    Raises:
        ValueError: the stored run was made with other settings; the message lists each key (old -> new) and both
            ways out.
    """
    root = selfee_root(cfg.output_dir)
    path = root / STATE_FILE
    new = fingerprint(cfg, selfee, pool)
    if not path.exists():
        return {"fingerprint": new, "completed": []}
    state = json.loads(path.read_text())
    old = state["fingerprint"]
    changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v and k != "selfee.round_sizes"}
    old_sizes, new_sizes = old.get("selfee.round_sizes", []), new["selfee.round_sizes"]
    if new_sizes[: len(old_sizes)] != old_sizes:
        changed["selfee.rounds"] = (old_sizes, new_sizes)
    if changed:
        details = "\n".join(f"  {key}: {a!r} -> {b!r}" for key, (a, b) in sorted(changed.items()))
        raise ValueError(
            f"{root} holds a SELFEE run made with other settings, and resuming would mix incompatible rounds:\n"
            f"{details}\nEither restore these settings to resume it, or set a new output_dir to start a new run. "
            "(Appending rounds to selfee.rounds is allowed; speed settings such as generation.batch_size may change.)"
        )
    state["fingerprint"] = new  # appended rounds become part of the stored plan
    return state


def save_state(root, state: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / STATE_FILE, state)
