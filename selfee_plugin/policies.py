"""Where each round's policy is kept: saved after the round, loaded on resume, snapshot and restored by the guard."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights
from transformers import AutoModelForCausalLM

from . import distributed
from .artifacts import policy_dir
from .references import POLICY_ADAPTER, adapter_parameters


class PolicyStore:
    """The trainer's policy under `output_dir/selfee/round_<t>/`: the LoRA adapter, or the whole model under full
    fine-tuning (`artifacts.policy_dir`)."""

    def __init__(self, trainer, root: Path):
        self.trainer, self.root = trainer, root
        self.peft = is_peft_model(trainer.model)

    @property
    def model(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def save(self, round_idx: int, out: Path | None = None) -> None:
        out = out or policy_dir(self.root, round_idx, self.peft)
        if self.peft:
            if distributed.is_main():
                self.trainer.model.save_pretrained(str(out), selected_adapters=[POLICY_ADAPTER])
        else:
            self.trainer.save_model(str(out))  # every rank calls it; it writes on the main process only

    def load(self, round_idx: int) -> None:
        src = policy_dir(self.root, round_idx, self.peft)
        if self.peft:
            set_peft_model_state_dict(self.trainer.model, load_peft_weights(str(src)), adapter_name=POLICY_ADAPTER)
        else:
            state = AutoModelForCausalLM.from_pretrained(str(src), dtype=self.trainer.model.dtype).state_dict()
            self.model.load_state_dict(state)

    def snapshot(self, round_idx: int):
        """pi_{round_idx - 1}'s weights, to restore: the adapter's tensors, or under full fine-tuning the previous
        round's saved model (a CPU copy of the whole model only when none was saved)."""
        if self.peft:
            return {n: p.detach().to("cpu", copy=True) for n, p in adapter_parameters(self.model).items()}
        if policy_dir(self.root, round_idx - 1, False).exists():
            return round_idx - 1
        return {n: t.detach().to("cpu", copy=True) for n, t in self.model.state_dict().items()}

    def restore(self, snapshot) -> None:
        if isinstance(snapshot, int):
            self.load(snapshot)
        elif self.peft:
            with torch.no_grad():
                for name, param in adapter_parameters(self.model).items():
                    param.copy_(snapshot[name])
        else:
            self.model.load_state_dict(snapshot)
