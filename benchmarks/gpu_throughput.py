"""Self-annotation at the users' scale: generation, judgment and a refine DPO step on a random-weight 7B, as ratios.

The model has Mistral-7B's shapes (vocabulary 32000, hidden 4096, 32 layers, MLP 14336, 32 heads / 8 KV heads) with
random weights, quantized and adapted as `example_configs/zephyr-7b-qlora.yml` does (nf4 + double quantization, bf16
compute, LoRA r16 / alpha 32 on every linear layer, gradient checkpointing). Nothing is downloaded. Prompts are
random words of `--prompt-tokens` tokens; random weights rarely sample EOS, so every answer runs to `--max-new-tokens`,
the worst case for the KV cache.

Per phase it prints tokens/s, seconds and peak GiB (accelerator; 0 on CPU):
    generation at the old default (16 prompts x 2), with `batch_size: auto` (the card capped at --budget-gib,
    merge_adapter auto), auto on the whole card, and merged (auto + merge_adapter: true); with --hf-baseline also
    HF generate (the sampler without its static decode loop and CUDA graphs) on the whole card;
    judgment (policy + adapters-off reference, float32 sums) vs a bare forward of the same batches;
    a refine DPO step of the plugin's own `SelfeeDPOTrainer` (`training_step` on a batch of its collator, then the
    optimizer step) with judged reference columns vs the same trainer on pairs without them, which runs the
    reference forward itself;
and the projected wall time of the paper's recipe from those numbers.

What must be installed (checked by running `--small` in a venv without system site packages): torch, transformers,
peft, accelerate, trl 1.9, bitsandbytes and datasets, each with its dependencies (pydantic comes with transformers);
Axolotl 0.19 without its dependencies (`pip install --no-deps axolotl==0.19.0`) plus the modules the trainer's imports
of it need (`pip install addict numba colorama posthog pillow`); and the plugin from this checkout
(`pip install --no-deps -e .`, which serves the top-level patches/ as `selfee_plugin.patches`).

    python benchmarks/gpu_throughput.py                # on a GPU (about 3 minutes on an H200)
    python benchmarks/gpu_throughput.py --small        # tiny shapes on CPU, under a minute (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the plugin, when run from a checkout

SHAPES = {
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                       num_attention_heads=32, num_key_value_heads=8),
    "small": dict(vocab_size=1024, hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                  num_attention_heads=4, num_key_value_heads=2),
}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
SPECIALS = ["<|pad|>", "<|unk|>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# The paper's recipe (SPA section 4.1): 2K seed pairs x 3 epochs, rounds of 8K and 20K prompts, 2 samples each.
RECIPE = {"seed_pairs": 2000, "seed_epochs": 3, "round_prompts": [8000, 20000], "samples": 2}


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer whose vocabulary is exactly `vocab_size` ("w0", "w1", ... plus specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"w{i}": len(SPECIALS) + i for i in range(vocab_size - len(SPECIALS))})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", unk_token="<|unk|>", pad_token="<|pad|>",
        additional_special_tokens=SPECIALS[4:], chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )


def build_qlora_model(shape: dict, device: torch.device, tokenizer, quantize: bool = True):
    """Random-weight Mistral, its linear layers quantized to nf4 (bf16 compute) in place, LoRA r16 on all of them."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    from selfee_plugin.patches import bitsandbytes_cpu_weight_packing

    dtype = torch.bfloat16
    config = MistralConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM._from_config(config, dtype=dtype)
    if quantize:
        for name, module in list(model.model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear):
                    layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                                              compress_statistics=True, quant_type="nf4", device="meta")
                    layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True, module=layer)._quantize(device)
                    setattr(module, child_name, layer)
        model.is_loaded_in_4bit = True  # what PEFT reads to wrap bitsandbytes layers as lora.Linear4bit
        bitsandbytes_cpu_weight_packing.apply(model)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


@dataclass
class Row:
    phase: str
    tokens_per_second: float
    seconds: float
    peak_gib: float
    note: str = ""


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def random_prompts(count: int, tokens: int, vocab: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    words = vocab - len(SPECIALS)
    return [[{"role": "user", "content": " ".join(f"w{rng.randrange(words)}" for _ in range(tokens))}]
            for _ in range(count)]


def measure_generation(model, tokenizer, prompts, device, phase, max_new_tokens, static_decode: bool = True,
                       **gen) -> tuple[Row, list]:
    from selfee_plugin.config_blocks import GenerationConfig
    from selfee_plugin.generation import HFSampler
    from selfee_plugin.static_decoding import StaticDecoder

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.7, top_p=1.0, max_prompt_length=4096, **gen)
    sampler = HFSampler(model, tokenizer, cfg)
    if not static_decode:  # HF generate on every device
        sampler.static_decoder = StaticDecoder(device_types=())
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    out = sampler.generate(prompts, n=2, seed=0)
    _sync(device)
    seconds = time.perf_counter() - start
    batches = -(-len(prompts) // out.batch_prompts)  # the sampler splits the prompts evenly over this many batches
    note = f"{batches} batch(es) of {len(prompts) / batches * 2:.0f} sequences (batch size {out.batch_prompts * 2})"
    row = Row(phase, out.generated_tokens / seconds, seconds, _peak_gib(device), note)
    print(f"  {phase}: {out.generated_tokens} tokens in {seconds:.1f} s ({row.tokens_per_second:,.0f} tokens/s), "
          f"{note}, peak {row.peak_gib:.1f} GiB", flush=True)
    return row, out


def measure_judgment(model, tokenizer, sequences, device, max_tokens: int) -> list[Row]:
    """The judge (policy + adapters-off reference, logits only from the completion, float32 sums) vs a bare forward
    of the same token-budget batches under both models (full logits, nothing else)."""
    from trl.trainer.utils import pad

    from selfee_plugin.formatting import pad_token_id
    from selfee_plugin.judge import score_sequences
    from selfee_plugin.logprobs import Scorer, token_budget_batches

    batches = token_budget_batches([len(p) + len(c) for p, c in sequences], max_tokens)
    full, shared_prompts = (Scorer(pad_token_id(tokenizer), max_tokens, share_prompts=s) for s in (False, True))

    def bare(batches):
        for adapters in (True, False):
            for batch in batches:
                ids = pad([torch.tensor(sequences[i][0] + sequences[i][1]) for i in batch], tokenizer.pad_token_id)
                mask = pad([torch.ones(len(sequences[i][0]) + len(sequences[i][1]), dtype=torch.long) for i in batch])
                if adapters:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                else:
                    with model.disable_adapter():
                        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)

    model.eval()
    with torch.no_grad():  # warm-up of both at the largest batch (kernels, allocator growth), not timed
        score_sequences(model, [sequences[i] for i in batches[0]], full)
        bare(batches[:1])
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        _, _, _, tokens = score_sequences(model, sequences, full)
    _sync(device)
    judge = Row("judgment (policy + reference, float32 sums)", 0.0, time.perf_counter() - start, _peak_gib(device))
    judge.tokens_per_second = tokens / judge.seconds

    with torch.no_grad():  # warm-up of the shared-prompt path, not timed
        score_sequences(model, [sequences[i] for i in batches[0]], shared_prompts)
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        score_sequences(model, sequences, shared_prompts)
    _sync(device)
    shared = Row("judgment, judge.share_prompts (each prompt forwarded once)", 0.0, time.perf_counter() - start,
                 _peak_gib(device))
    shared.tokens_per_second = tokens / shared.seconds

    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        bare(batches)
    _sync(device)
    bare_row = Row("bare forward of the same batches (both models)", 0.0, time.perf_counter() - start,
                   _peak_gib(device))
    bare_row.tokens_per_second = tokens / bare_row.seconds
    for row in (judge, shared):
        row.note = f"{row.tokens_per_second / bare_row.tokens_per_second:.2f}x the bare forward"
    return [judge, shared, bare_row]


def build_trainer(model, tokenizer, dataset, device, output_dir: str, max_length: int):
    """`SelfeeDPOTrainer` of a `selfee:` run with the default refine settings, as the plugin builds it when the run
    starts from an adapter; the one place that follows the trainer's constructor."""
    from axolotl.core.trainers.dpo.args import AxolotlDPOConfig
    from axolotl.utils.dict import DictDefault

    from selfee_plugin.args import SelfeeConfig
    from selfee_plugin.context import RunContext
    from selfee_plugin.trainer import SelfeeDPOTrainer

    args = AxolotlDPOConfig(
        output_dir=output_dir, per_device_train_batch_size=1, learning_rate=1e-6, beta=0.1, max_length=max_length,
        bf16=device.type == "cuda", use_cpu=device.type == "cpu", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False, report_to="none",
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    # Axolotl hands the plugin its validated config with the `selfee:` block as plain dicts.
    run = RunContext.from_cfg(DictDefault({"selfee": SelfeeConfig(rounds=0).model_dump()}))
    return SelfeeDPOTrainer(model, None, args=args, train_dataset=dataset, processing_class=tokenizer, run_context=run)


def measure_dpo_step(trainer, device, steps: int, online_reference: bool) -> Row:
    """The trainer's own refine-round step: `training_step` (TRL's loss on float32 logits plus SPA's smoothing term,
    backward) and the optimizer step, on one pair from its collator. With `online_reference` the pair has no judged
    reference columns, so the trainer runs the reference forward itself (for TRL's loss and for noise detection)."""
    judged = trainer.train_dataset
    if online_reference:
        trainer.train_dataset = judged.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
    trainer.begin_round(refine=True)  # as the round loop starts a judged round
    batch = trainer.data_collator([trainer.train_dataset[0]])
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what `Trainer.train` sets before each step
    times = []
    _reset_peak(device)
    for step in range(steps + 1):  # the first step warms up kernels and allocator; not timed
        _sync(device)
        start = time.perf_counter()
        trainer.training_step(trainer.model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step:
            times.append(time.perf_counter() - start)
    trainer.train_dataset = judged
    seconds = sorted(times)[len(times) // 2]  # median: a 1-pair step is host-bound and has outliers
    tokens = int(batch["attention_mask"].sum())
    name = "DPO step, online reference forward" if online_reference else "DPO step, judged reference columns"
    note = f"median of {steps} steps" + ("; the reference forward runs twice: TRL's loss, noise detection"
                                         if online_reference else "")
    return Row(name, tokens / seconds, seconds, _peak_gib(device), note)


def dpo_pairs(prompt_tokens: int, completion_tokens: int, vocab: int):
    """One pair of random words (each word one token) with judged reference columns, as a round's judged pairs."""
    from datasets import Dataset

    rng = random.Random(0)

    def words(count: int) -> str:
        return " ".join(f"w{rng.randrange(vocab - len(SPECIALS))}" for _ in range(count))

    # TRL tokenizes prompt + answer as one string: the trailing space keeps the last prompt word its own token.
    return Dataset.from_dict({"prompt": [words(prompt_tokens) + " "], "chosen": [words(completion_tokens)],
                              "rejected": [words(completion_tokens)], "ref_chosen_logps": [-500.0],
                              "ref_rejected_logps": [-510.0]})


def project_recipe(gen: Row, judge: Row, step: Row, prompt_tokens: int, new_tokens: int) -> dict:
    """Hours of the paper's recipe at the measured speeds (DPO steps of one pair, as micro_batch_size: 1)."""
    prompts = sum(RECIPE["round_prompts"])
    generate = prompts * RECIPE["samples"] * new_tokens / gen.tokens_per_second
    judged_tokens = prompts * RECIPE["samples"] * (prompt_tokens + new_tokens) * 2  # policy + reference
    judge_s = judged_tokens / judge.tokens_per_second
    train = (RECIPE["seed_pairs"] * RECIPE["seed_epochs"] + prompts) * step.seconds
    return {"generation_h": generate / 3600, "judgment_h": judge_s / 3600, "training_h": train / 3600,
            "total_h": (generate + judge_s + train) / 3600}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes on CPU (under a minute)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per generation phase")
    parser.add_argument("--prompt-tokens", type=int, default=150)
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--budget-gib", type=float, default=24.0, help="card size `auto` is measured against")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--skip-old-default", action="store_true", help="skip the old-default phase (GPU)")
    parser.add_argument("--hf-baseline", action="store_true",
                        help="also time HF generate (the sampler before its static decode loop) on the whole card")
    parser.add_argument("--judgment-only", type=int, default=0, metavar="REPEATS",
                        help="only judgment vs the bare forward, REPEATS times, on 128 random prompts x 2 random "
                        "answers (random weights never stop early, so sampled answers are as random and as long)")
    args = parser.parse_args()

    small = args.small or not torch.cuda.is_available()
    device = torch.device("cpu") if small else torch.device("cuda", torch.cuda.current_device())
    shape = SHAPES["small" if small else "mistral-7b"]
    prompt_tokens, new_tokens = (24, 16) if args.small else (args.prompt_tokens, args.max_new_tokens)
    tokenizer = build_tokenizer(shape["vocab_size"])
    start = time.perf_counter()
    model = build_qlora_model(shape, device, tokenizer)
    print(f"model: {'small' if small else 'mistral-7b'} shapes, QLoRA nf4 + LoRA r16, built in "
          f"{time.perf_counter() - start:.0f} s on {torch.cuda.get_device_name() if not small else 'CPU'}")
    vocab = shape["vocab_size"]
    rows = []

    if args.judgment_only:
        # As the judge sees them: 2 answers per prompt (128 prompts; 16 on CPU).
        gen = torch.Generator().manual_seed(0)
        sequences = []
        for _ in range(16 if small else 128):
            prompt = torch.randint(len(SPECIALS), vocab, (prompt_tokens,), generator=gen).tolist()
            sequences += [(prompt, torch.randint(len(SPECIALS), vocab, (new_tokens,), generator=gen).tolist())
                          for _ in range(2)]
        for repeat in range(args.judgment_only):
            judge_row, shared_row, bare_row = measure_judgment(model, tokenizer, sequences, device,
                                                               2048 if small else 16384)
            print(f"  repeat {repeat}: judgment {judge_row.tokens_per_second:,.0f} tokens/s ({judge_row.seconds:.2f} s, "
                  f"{judge_row.peak_gib:.1f} GiB), bare forward {bare_row.tokens_per_second:,.0f} tokens/s "
                  f"({bare_row.seconds:.2f} s): {judge_row.note}; share_prompts {shared_row.note}", flush=True)
        return

    old_prompts = random_prompts(args.prompts or 16, prompt_tokens, vocab)
    measure_generation(model, tokenizer, old_prompts[:2], device, "warm-up", 4, batch_size=2, merge_adapter=False)
    if small:  # CPU: the ratio the acceptance asks for, auto vs one prompt at a time
        one, _ = measure_generation(model, tokenizer, old_prompts[:8], device, "generation, batch 1 prompt x 2",
                                    new_tokens, batch_size=1, merge_adapter=False)
        rows.append(one)
        auto, gens = measure_generation(model, tokenizer, random_prompts(args.prompts or 64, prompt_tokens, vocab),
                                        device, "generation, batch_size auto", new_tokens, batch_size="auto")
        auto.note += f"; {auto.tokens_per_second / one.tokens_per_second:.1f}x batch 1"
        rows.append(auto)
        merged, _ = measure_generation(model, tokenizer, old_prompts[:8], device, "generation, merged, batch 1",
                                       new_tokens, batch_size=1, merge_adapter=True)
        merged.note += f"; {merged.tokens_per_second / one.tokens_per_second:.1f}x unmerged batch 1"
        rows.append(merged)
        default_row = auto
    else:
        old = None
        if not args.skip_old_default:  # a per-batch rate: 32 prompts (2 batches) are enough
            old, _ = measure_generation(model, tokenizer, old_prompts[:32], device,
                                        "generation, old default (batch_size 16)", new_tokens, batch_size=16,
                                        merge_adapter=False)
            rows.append(old)
        many = random_prompts(args.prompts or 256, prompt_tokens, vocab, seed=1)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * 2**30 / total), device)
        default_row, gens = measure_generation(model, tokenizer, many, device,
                                               f"generation, default (auto, {args.budget_gib:.0f} GiB card)",
                                               new_tokens, batch_size="auto")
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        rows.append(default_row)
        merged, _ = measure_generation(model, tokenizer, many, device, "generation, auto, whole card, merged",
                                       new_tokens, batch_size="auto", merge_adapter=True)
        rows.append(merged)
        full, _ = measure_generation(model, tokenizer, many, device, "generation, auto, whole card, unmerged",
                                     new_tokens, batch_size="auto", merge_adapter=False)
        rows.append(full)
        if args.hf_baseline:
            hf, _ = measure_generation(model, tokenizer, many, device,
                                       "generation, auto, whole card, unmerged, HF generate", new_tokens,
                                       static_decode=False, batch_size="auto", merge_adapter=False)
            hf.note += f"; the static loop above is {full.tokens_per_second / hf.tokens_per_second:.1f}x"
            rows.append(hf)
        for row in rows[1:] if old is not None else []:
            row.note += f"; {row.tokens_per_second / old.tokens_per_second:.1f}x old default"

    from selfee_plugin.formatting import format_completion, tokenize_completion

    sequences = [tokenize_completion(tokenizer, prompt, format_completion(tokenizer, answer))
                 for prompt, answers in zip(gens.prompts, gens.responses) if answers for answer in answers]
    sequences = sequences[: 32 if small else 256]
    judge_rows = measure_judgment(model, tokenizer, sequences, device, max_tokens=2048 if small else 16384)
    rows += judge_rows
    print(f"  {judge_rows[0].phase}: {judge_rows[0].tokens_per_second:,.0f} tokens/s, {judge_rows[0].note}", flush=True)

    completion_tokens = 2 * new_tokens if small else new_tokens
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(model, tokenizer, dpo_pairs(prompt_tokens, completion_tokens, vocab), device,
                                output_dir, max_length=prompt_tokens + completion_tokens + 1)  # + EOS
        judged = measure_dpo_step(trainer, device, steps=2 if small else 8, online_reference=False)
        online = measure_dpo_step(trainer, device, steps=2 if small else 8, online_reference=True)
    judged.note += f"; {judged.seconds / online.seconds:.2f}x the online-reference step time"
    rows += [judged, online]
    print(f"  refine step {judged.seconds:.3f} s judged columns vs {online.seconds:.3f} s online reference", flush=True)

    print("\n| phase | tokens/s | seconds | peak GiB | note |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.phase} | {row.tokens_per_second:,.0f} | {row.seconds:.2f} | {row.peak_gib:.1f} | {row.note} |")
    projection = project_recipe(default_row, judge_rows[0], judged, prompt_tokens, new_tokens)
    print("\nprojected paper recipe (2K seed pairs x 3 epochs, rounds of 8K + 20K prompts, 2 samples of "
          f"{new_tokens} tokens) at the default generation: "
          + ", ".join(f"{k.removesuffix('_h')} {v:.1f} h" for k, v in projection.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [row.__dict__ for row in rows], "projection": projection}, f, indent=2)


if __name__ == "__main__":
    main()
