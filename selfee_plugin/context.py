"""The run context: what a SELFEE run knows before any weights load, built once and handed to the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .args import SelfeeConfig, parse_selfee
from .artifacts import selfee_root


@dataclass
class RunContext:
    """Filled by the plugin's hooks in the order Axolotl calls them, then read by the trainer and the round loop.

    Attributes:
        cfg: Axolotl's validated config (its `selfee:` block as plain dicts).
        selfee: that block, parsed and validated once.
        pool: the prompt pool (`prompt_pool.PromptPool`); None when no round samples.
        state: the resume state (`resume.check_resume`): the run's fingerprint and finished rounds.
        eval_rows: held-out human pairs measuring the judge each round (`judge.eval_pairs`: a file, or the seed
            pairs `auto` held out of round 0), as formatted prompt/chosen/rejected rows; None when off.
        held_out_seed_pairs: whether `eval_rows` are seed pairs held out by `auto` (saved beside the run).
    """

    cfg: Any
    selfee: SelfeeConfig
    pool: Any = None
    state: dict | None = None
    eval_rows: list[dict] | None = None
    held_out_seed_pairs: bool = False

    @classmethod
    def from_cfg(cls, cfg) -> RunContext | None:
        """The context of a config with a `selfee:` block (None without one)."""
        selfee = parse_selfee(cfg)
        return cls(cfg, selfee) if selfee is not None else None

    @property
    def root(self) -> Path:
        return selfee_root(self.cfg.output_dir)
