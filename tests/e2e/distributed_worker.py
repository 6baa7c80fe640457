"""One rank of `annotate.annotate_round` on the tiny model, for tests/e2e/test_distributed_e2e.py (not a test
itself).

Usage: PYTHONPATH=tests torchrun --nproc_per_node N tests/e2e/distributed_worker.py MODEL_DIR WORK_DIR
(tests/ on the path: it imports helpers.)
WORK_DIR holds `prompts.json` ([prompt_id, chat turns] per prompt) and `round_1/`; each rank writes `rank<r>.json`
with the round's metrics and the prompt ids it was handed to generate and judge.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(model_dir: str, work_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import selfee_plugin.annotate as annotate_module
    from helpers import _lora
    from selfee_plugin.args import SelfeeConfig

    received = []
    real_annotate = annotate_module.annotate

    def recording_annotate(model, tokenizer, prompts, *args, **kwargs):
        received.extend(pid for pid, _ in prompts)
        return real_annotate(model, tokenizer, prompts, *args, **kwargs)

    annotate_module.annotate = recording_annotate  # annotate_round calls the module's name at call time

    work = Path(work_dir)
    prompts = [tuple(p) for p in json.loads((work / "prompts.json").read_text())]
    selfee = SelfeeConfig.model_validate(json.loads((work / "selfee.json").read_text()))
    model = _lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), seed=0)
    metrics, _ = annotate_module.annotate_round(
        model, AutoTokenizer.from_pretrained(model_dir), 1, prompts, selfee, 0.1, work / "round_1" / "pairs.jsonl",
        max_length=64,
    )
    (work / f"rank{dist.get_rank()}.json").write_text(json.dumps({"metrics": metrics, "received": received}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
