"""One rank of `RoundRunner.annotate_round` on the tiny model, for tests/test_distributed.py (not a test itself).

Usage: torchrun --nproc_per_node N tests/distributed_worker.py MODEL_DIR WORK_DIR
WORK_DIR holds `prompts.json` ([prompt_id, chat turns] per prompt) and `round_1/`; each rank writes `rank<r>.json`
with the round's metrics and the prompt ids it was handed to generate and judge.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist


def main(model_dir: str, work_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import selfee_plugin.annotate as annotate_module
    from helpers import _lora
    from selfee_plugin.args import SelfeeConfig
    from selfee_plugin.rounds import RoundRunner

    received = []
    real_annotate = annotate_module.annotate

    def recording_annotate(model, tokenizer, prompts, *args, **kwargs):
        received.extend(pid for pid, _ in prompts)
        return real_annotate(model, tokenizer, prompts, *args, **kwargs)

    annotate_module.annotate = recording_annotate  # annotate_round imports it at call time

    work = Path(work_dir)
    prompts = [tuple(p) for p in json.loads((work / "prompts.json").read_text())]
    selfee = SelfeeConfig.model_validate(json.loads((work / "selfee.json").read_text()))
    model = _lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), seed=0)
    runner = RoundRunner.__new__(RoundRunner)
    runner.model, runner.selfee, runner.judge_reference, runner.root = model, selfee, None, work
    runner.trainer = SimpleNamespace(
        accelerator=SimpleNamespace(unwrap_model=lambda m: m), beta=0.1, args=SimpleNamespace(max_length=64),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    metrics, _ = runner.annotate_round(1, prompts, work / "round_1" / "pairs.jsonl")
    (work / f"rank{dist.get_rank()}.json").write_text(json.dumps({"metrics": metrics, "received": received}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
