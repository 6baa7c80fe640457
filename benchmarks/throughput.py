"""Throughput of self-annotation: batched (KV cache, left padding) vs one prompt at a time, as ratios.

Uses the demo's SFT model with a fresh LoRA adapter (as in a LoRA round). Prints tokens/s for generation and
judgment at each batch size and the ratio to batch size 1; absolute numbers depend on the machine, ratios less so.

    python benchmarks/throughput.py --prompts 128 --batch-sizes 1 16 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

# The demo package lives outside the wheel, in examples/selfee_demo.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_output")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfee_demo.build import build_demo
    from selfee_demo.evaluate import read_jsonl
    from selfee_plugin.args import GenerationConfig
    from selfee_plugin.generation import generate_responses, tokenize_completion
    from selfee_plugin.judge import score_sequences

    paths = build_demo(os.path.join(args.out, "data"), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(paths["sft_model"])
    model = AutoModelForCausalLM.from_pretrained(paths["sft_model"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in read_jsonl(paths["prompts"])[: args.prompts]]

    rows = []
    for batch_size in args.batch_sizes:
        cfg = GenerationConfig(max_new_tokens=12, temperature=0.7, batch_size=batch_size)
        start = time.perf_counter()
        gens = generate_responses(model, tokenizer, prompts, cfg, n=2, seed=0, progress=False)
        gen_seconds = time.perf_counter() - start
        sequences = [
            tokenize_completion(tokenizer, prompt, response)
            for prompt, responses in zip(gens.prompts, gens.responses) if responses
            for response in responses
        ]
        start = time.perf_counter()
        with torch.no_grad():
            _, _, _, judged_tokens = score_sequences(model, tokenizer, sequences, reference=None, batch_size=batch_size)
        judge_seconds = time.perf_counter() - start
        rows.append((batch_size, gens.generated_tokens / gen_seconds, judged_tokens / judge_seconds))

    base_gen, base_judge = rows[0][1], rows[0][2]
    print(f"{args.prompts} prompts x 2 samples, demo SFT model + LoRA, {torch.get_num_threads()} threads")
    print("| batch size | generation tokens/s | ratio | judgment tokens/s | ratio |")
    print("|---|---|---|---|---|")
    for batch_size, gen, judge in rows:
        print(f"| {batch_size} | {gen:.0f} | {gen / base_gen:.1f}x | {judge:.0f} | {judge / base_judge:.1f}x |")


if __name__ == "__main__":
    main()
