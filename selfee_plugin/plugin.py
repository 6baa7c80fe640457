"""SelfeePlugin: Axolotl hooks that wire SELFEE in; the algorithm lives in the other modules."""

from __future__ import annotations

import functools

from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from .args import parse_selfee

LOG = get_logger(__name__)


class SelfeePlugin(BasePlugin):
    """Adds the `selfee:` block and runs the SELFEE round loop inside `axolotl train` for `rl: dpo`."""

    def __init__(self):
        super().__init__()
        self._model = None
        self._model_ref = None
        self._pool = None

    def get_input_args(self) -> str:
        return "selfee_plugin.args.SelfeeArgs"

    def pre_model_load(self, cfg):
        # Load the prompt pool before any model, so a bad pool fails in seconds, not after loading weights.
        selfee = parse_selfee(cfg)
        if selfee and selfee.round_sizes:
            from .strategies import load_prompt_pool

            self._pool = load_prompt_pool(selfee, selfee.round_sizes)
            LOG.info(f"selfee: prompt pool of {len(self._pool)} prompts for rounds {selfee.round_sizes}")

    def post_model_load(self, cfg, model):
        # Axolotl loads the policy first and, for full fine-tuning, the reference second (axolotl/train.py
        # setup_model_and_trainer); both pass through this hook, in that order.
        if not cfg.selfee:
            return
        if self._model is None:
            self._model = model
        else:
            self._model_ref = model

    def get_trainer_cls(self, cfg):
        if not cfg.selfee:
            return None
        from .trainer import SelfeeDPOTrainer

        # Axolotl 0.19's RL builder passes no model positionally to a plugin's trainer class (upstream PR #2883),
        # so the models captured in post_model_load are bound here.
        return functools.partial(SelfeeDPOTrainer, self._model, self._model_ref, selfee_cfg=cfg)

    def post_trainer_create(self, cfg, trainer):
        if cfg.selfee:
            trainer.prompt_pool = self._pool
