"""SelfeePlugin: Axolotl hooks that wire SELFEE in; the algorithm lives in the other modules."""

from __future__ import annotations

import math
import random

from axolotl.integrations.base import BasePlugin

from ._logging import get_logger
from .config_blocks import AUTO_EVAL_SHARE
from .context import RunContext
from .data_checks import preflight
from .patches import axolotl_multiprocess_cpu, bitsandbytes_cpu_weight_packing

LOG = get_logger(__name__)

NO_SEED_COLUMNS = {"prompt": [], "chosen": [], "rejected": []}
# TRL 1.9's DPOTrainer.__init__ reads the first row of its train_dataset (`next(iter(...))`, to detect the format),
# so with no seed pairs it is built on this one row and then given the empty seed set; the row is never trained on.
FORMAT_PROBE_ROW = {"prompt": ["x"], "chosen": ["y"], "rejected": ["z"]}


class SelfeePlugin(BasePlugin):
    """Adds the `selfee:` block and runs the SELFEE round loop inside `axolotl train` for `rl: dpo`."""

    def __init__(self):
        super().__init__()
        self._run = None  # the RunContext, built from the first hook that sees the config
        self._model = None
        self._model_ref = None

    def _context(self, cfg) -> RunContext | None:
        if self._run is None:
            self._run = RunContext.from_cfg(cfg)
        return self._run

    def get_input_args(self) -> str:
        return "selfee_plugin.args.SelfeeArgs"

    def register(self, cfg):
        # Runs in every process torchrun/accelerate starts, before Axolotl sets up the model loader.
        if cfg.get("selfee") is not None:
            axolotl_multiprocess_cpu.apply(LOG)

    def load_datasets(self, cfg, preprocess=False):
        # No seed pairs (`datasets:` absent, allowed by SelfeeArgs): Axolotl's own loader would fail on the missing
        # key, so hand it an empty seed set instead; the round loop then skips round 0. `axolotl preprocess` has
        # nothing to prepare (the prompt pool is read at the start of `axolotl train`).
        run = self._context(cfg)
        if run is None:
            return None
        if cfg.get("datasets"):
            return hold_out_eval_pairs(run) if run.selfee.judge.eval_pairs == "auto" else None
        from axolotl.common.datasets import TrainDatasetMeta
        from datasets import Dataset

        if preprocess:
            LOG.info("selfee: no seed pairs (`datasets:` is absent): nothing to preprocess")
        else:
            LOG.info(
                "selfee: no seed pairs (`datasets:` is absent): round 0 is skipped and the judge's pi_init is "
                f"selfee.judge.reference_model ({run.selfee.judge.reference_model})"
            )
        return TrainDatasetMeta(train_dataset=Dataset.from_dict(NO_SEED_COLUMNS), total_num_steps=0)

    def pre_model_load(self, cfg):
        # Everything that can fail without weights fails here, in seconds, not after loading a 7B model.
        run = self._context(cfg)
        if run is not None:
            preflight(run)

    def post_model_load(self, cfg, model):
        # Axolotl loads the policy first and, for full fine-tuning, the reference second (axolotl/train.py
        # setup_model_and_trainer); both pass through this hook, in that order.
        if not cfg.selfee:
            return
        bitsandbytes_cpu_weight_packing.apply(model, LOG)
        if self._model is not None:
            self._model_ref = model
            return
        if cfg.adapter and cfg.lora_model_dir:
            # For rl: dpo Axolotl 0.19 builds only a LoRA config (loaders/model.py `_load_adapters`, config_only)
            # and TRL then adds a fresh adapter: the SFT adapter in lora_model_dir would be ignored. SELFEE starts
            # from it, so load it trainable; TRL then copies it into its frozen `ref` adapter (= pi_init).
            from peft import PeftModel

            LOG.info(f"selfee: starting from the adapter in lora_model_dir={cfg.lora_model_dir}")
            model = PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=True)
        self._model = model

    def get_trainer_cls(self, cfg):
        if not cfg.selfee:
            return None
        from .trainer import SelfeeDPOTrainer

        model, model_ref, run = self._model, self._model_ref, self._context(cfg)

        # Axolotl 0.19's RL builder passes no model positionally to a plugin's trainer class (upstream PR #2883),
        # so the models captured in post_model_load are bound here.
        def build_trainer(*args, **kwargs):
            from datasets import Dataset
            from peft import PeftModel

            if isinstance(model, PeftModel):
                kwargs.pop("peft_config", None)  # the adapter is already there; TRL refuses both
            elif cfg.seed is not None:
                # TRL adds the LoRA adapter inside __init__, before Trainer seeds anything: seed its random
                # init here, or two runs of the same config and seed train different adapters.
                from transformers import set_seed

                set_seed(cfg.seed)
            seed_pairs = kwargs.get("train_dataset")
            if isinstance(seed_pairs, Dataset) and len(seed_pairs) == 0:
                kwargs["train_dataset"] = Dataset.from_dict(FORMAT_PROBE_ROW)
                trainer = SelfeeDPOTrainer(model, model_ref, *args, run_context=run, **kwargs)
                trainer.train_dataset = seed_pairs  # empty: the round loop skips round 0
                return trainer
            return SelfeeDPOTrainer(model, model_ref, *args, run_context=run, **kwargs)

        return build_trainer


def hold_out_eval_pairs(run: RunContext):
    """`judge.eval_pairs: auto`: Axolotl loads the seed pairs as usual; a fixed AUTO_EVAL_SHARE of them (by `seed`)
    is kept out of round 0 and measures the judge each round, as a held-out human-pairs file would."""
    from axolotl.common.datasets import TrainDatasetMeta, load_preference_datasets

    cfg = run.cfg
    meta = load_preference_datasets(cfg=cfg)
    rows = len(meta.train_dataset)
    order = list(range(rows))
    random.Random(cfg.seed if cfg.seed is not None else 42).shuffle(order)
    held = sorted(order[: max(1, round(AUTO_EVAL_SHARE * rows))])
    if rows - len(held) < 1:
        raise ValueError(f"selfee.judge.eval_pairs: auto needs at least 2 seed pairs; `datasets:` has {rows}.")
    train = meta.train_dataset.select(sorted(order[len(held):]))
    run.eval_rows = meta.train_dataset.select(held).select_columns(["prompt", "chosen", "rejected"]).to_list()
    run.held_out_seed_pairs = True
    LOG.info(f"selfee: judge.eval_pairs: auto: {len(held)} of {rows} seed pairs held out of round 0 to measure "
             "the judge each round")
    return TrainDatasetMeta(
        train_dataset=train, eval_dataset=meta.eval_dataset,
        total_num_steps=math.ceil(len(train) * cfg.num_epochs / cfg.batch_size),
    )
