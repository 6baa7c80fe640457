"""Build the demo: a tokenizer, a tiny SFT Llama trained from scratch on noisy answers, and the data files."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import statistics
import time
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from .evaluate import MAX_NEW_TOKENS, TEMPERATURE, quality_stats, sample_responses
from .task import EVENS_ITEMS, NUM_ITEMS, NUM_VALUES, TASKS, gold_score, make_demonstration, sample_prompts, vocabulary
from .tiny import build_tiny_llama, build_tokenizer

LOG = logging.getLogger(__name__)

# Bump when anything that changes the built files changes (task, training, sampling); a cached build whose
# stamp differs is rebuilt.
DEMO_VERSION = 2
STAMP_FILE = "demo_stamp.json"
FILES = {
    "sft_model": "sft_model",
    "seed": "seed.jsonl",
    "prompts": "prompts.jsonl",
    "eval_prompts": "eval_prompts.jsonl",
    "eval_pairs": "eval_pairs.jsonl",
    "gold_pairs": "gold_pairs.jsonl",
}
# A small Llama: big enough to learn sorting five numbers in about a minute on 2 CPU cores, small enough that
# a SELFEE round (generate, judge, train) stays in seconds.
MODEL_KWARGS = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}


@contextmanager
def _one_thread():
    """Run torch ops on one intra-op thread, restoring the caller's setting afterwards.

    At hidden size 64 a second thread buys little (a 600-step build trains ~15% faster with 2 threads on an idle
    2-core machine), but when anything else uses the cores OpenMP's waiting threads stall: measured here under
    load, 30 steps took 2.5-4.3s on 1 thread and 28-45s on 2.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _defaults(task: str = "fixed", **overrides) -> dict:
    """Build parameters for `task` (`fixed`: sort 5 numbers; `variable`: the evens of 7), updated by `overrides`."""
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}; known: {sorted(TASKS)}")
    params = {
        "task": task,
        "seed": 0,
        "num_pool": 2000,
        "num_seed_pairs": 96,
        "num_eval": 200,
        "num_eval_pairs": 200,
        "num_references": 4,
        "train_steps": 600,
        "batch_size": 128,
        "learning_rate": 3e-3,
        "min_noise": 0.5,
        "max_noise": 1.0,
        "temperature": TEMPERATURE,
        "max_new_tokens": MAX_NEW_TOKENS,
        "num_items": NUM_ITEMS if task == "fixed" else EVENS_ITEMS,
        "num_values": NUM_VALUES,
        "model": MODEL_KWARGS,
    }
    unknown = set(overrides) - set(params)
    if unknown:
        raise ValueError(f"unknown build_demo parameter(s) {sorted(unknown)}; known: {sorted(params)}")
    params.update(overrides)
    return params


def _task_kwargs(params: dict) -> dict:
    """`sample_prompts` arguments for the build's task."""
    return {"prefix": TASKS[params["task"]], "num_items": params["num_items"], "num_values": params["num_values"]}


def _encode_demonstrations(tokenizer, conversations: list[list[dict]]):
    """Chat-template token ids and SFT labels: loss on the answer and its EOS only, as Axolotl's SFT masks it."""
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    enc = tokenizer(texts, return_tensors="pt", padding=True)  # right padding: labels are masked below anyway
    ids = enc["input_ids"]  # (B, T)
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    # every token up to and including the assistant header is prompt; everything after is the answer
    in_prompt = (ids == assistant).int().cumsum(1) == 0
    in_prompt |= ids == assistant
    labels = ids.masked_fill(in_prompt | (enc["attention_mask"] == 0), -100)
    return ids, enc["attention_mask"], labels


def train_sft(model, tokenizer, params: dict, exclude: set[str]) -> list[float]:
    """Train `model` from scratch on freshly drawn noisy demonstrations (AdamW, warmup then linear decay).

    Args:
        model: the randomly initialised Llama.
        tokenizer: the demo tokenizer.
        params: build parameters (`train_steps`, `batch_size`, `learning_rate`, `min_noise`, `max_noise`, ...).
        exclude: held-out prompts; demonstrations never use them, so seed/pool/eval prompts are unseen in SFT.

    Returns:
        The training loss of every step.
    """
    rng = random.Random(params["seed"] + 1)
    steps, lr = params["train_steps"], params["learning_rate"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup)))
    )
    noise = (params["min_noise"], params["max_noise"])
    task_kwargs = _task_kwargs(params)
    model.train()
    losses = []
    progress = tqdm(range(steps), desc="training SFT model", leave=False)
    for _ in progress:
        # a fresh copy of the held-out set per batch: prompts may repeat across batches, held-out ones never appear
        prompts = sample_prompts(rng, params["batch_size"], exclude=set(exclude), **task_kwargs)
        conversations = [make_demonstration(p, rng, *noise)["messages"] for p in prompts]
        ids, mask, labels = _encode_demonstrations(tokenizer, conversations)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def _pair_row(prompt: str, a: str, b: str) -> dict | None:
    """A gold-labelled pair in Axolotl's `chat_template.default` DPO shape, or None when it carries no label.

    Gold ties (identical answers included) have no label; an empty answer is never paired (as in the plugin), and
    Axolotl's DPO strategy could not locate empty content in the rendered template anyway.
    """
    gold_a, gold_b = gold_score(prompt, a), gold_score(prompt, b)
    if gold_a == gold_b or not a or not b:
        return None
    chosen, rejected = (a, b) if gold_a > gold_b else (b, a)
    return {
        "messages": [{"role": "user", "content": prompt}],
        "chosen": {"role": "assistant", "content": chosen},
        "rejected": {"role": "assistant", "content": rejected},
    }


def sample_gold_pairs(model, tokenizer, prompts: list[str], params: dict, seed: int) -> tuple[list, list]:
    """Two SFT samples per prompt, labelled by the gold score (higher = chosen); ties and empty answers are dropped.

    Returns:
        `(pairs, samples)`: the labelled pairs, and every prompt's two responses with their golds and token
        lengths (for the build's quality report).
    """
    responses, lengths, _ = sample_responses(
        model, tokenizer, prompts, n_samples=2, temperature=params["temperature"],
        max_new_tokens=params["max_new_tokens"], seed=seed,
    )
    pairs, samples = [], []
    for prompt, pair, lens in zip(prompts, responses, lengths):
        row = _pair_row(prompt, *pair)
        if row is not None:
            pairs.append(row)
        samples += [{"gold": gold_score(prompt, r), "length": n} for r, n in zip(pair, lens)]
    return pairs, samples


def sample_labelled_pairs(
    model, tokenizer, candidates: list[str], num_pairs: int, params: dict, seed: int, desc: str
) -> list[dict]:
    """Gold-labelled SFT pairs from the first candidate prompts, chunk by chunk, until `num_pairs` are labelled.

    Prompts whose two samples tie on gold are skipped (and their prompt is not reused), so the set has exactly
    `num_pairs` pairs unless the candidates run out, which is logged.
    """
    LOG.info(f"sampling {desc}: 2 SFT answers per prompt until {num_pairs} gold-labelled pairs")
    pairs: list[dict] = []
    for start in range(0, len(candidates), num_pairs):
        chunk = candidates[start : start + num_pairs]
        new, _ = sample_gold_pairs(model, tokenizer, chunk, params, seed + start)
        pairs += new
        if len(pairs) >= num_pairs:
            break
    if len(pairs) < num_pairs:
        LOG.warning(f"{desc}: only {len(pairs)} of {num_pairs} pairs (SFT samples tie on gold too often)")
    return pairs[:num_pairs]


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _stamp(params: dict) -> dict:
    return {"version": DEMO_VERSION, "params": params}


def _is_built(out_dir: str, params: dict) -> bool:
    path = os.path.join(out_dir, STAMP_FILE)
    if not os.path.exists(path) or not all(os.path.exists(os.path.join(out_dir, f)) for f in FILES.values()):
        return False
    with open(path) as f:
        stamp = json.load(f)
    # builds from before the variable mode stamped no task: they are fixed-mode builds, still valid
    stamp.get("params", {}).setdefault("task", "fixed")
    return {k: stamp.get(k) for k in ("version", "params")} == _stamp(params)


def build_demo(out_dir: str, seed: int = 0, force: bool = False, task: str = "fixed", **overrides) -> dict[str, str]:
    """Build (or reuse) the demo task: tokenizer, SFT model, seed pairs, prompt pool and evaluation data.

    Reuses `out_dir` when its stamp file matches this version and these parameters, so calling this from a
    test, a benchmark and the README's Quickstart costs one build. The stamp is written last, so an
    interrupted build is redone.

    Args:
        out_dir: directory for everything the demo needs.
        seed: seeds prompts, model initialisation, SFT training and sampling.
        force: rebuild even when the stamp matches.
        task: `fixed` (sort 5 numbers: every right answer has 5 items) or `variable` (the even numbers of 7, in
            the order given: right answers have 1-6 items); see `selfee_demo.task`.
        **overrides: size and training knobs (see `_defaults`): `num_pool`, `num_seed_pairs`, `num_eval`,
            `num_eval_pairs`, `num_references`, `train_steps`, `batch_size`, `learning_rate`, `min_noise`,
            `max_noise`, `temperature`, `max_new_tokens`, `num_items`, `num_values`, `model`.

    Returns:
        Paths by name: `sft_model` (HF model dir with tokenizer and chat template), `seed` (gold-labelled SFT
        pairs, `chat_template.default` DPO shape), `prompts` (unlabelled pool, `{"prompt"}`), `eval_prompts`
        (`{"prompt", "references"}`: held-out prompts and SFT samples for the win rate), `eval_pairs` (held-out
        gold-labelled pairs, seed shape), `gold_pairs` (gold labels for the pool's SFT pairs), `stamp`.
    """
    params = _defaults(task, seed=seed, **overrides)
    paths = {name: os.path.join(out_dir, f) for name, f in FILES.items()}
    paths["stamp"] = os.path.join(out_dir, STAMP_FILE)
    if not force and _is_built(out_dir, params):
        LOG.info(f"demo already built in {out_dir} (stamp matches); reusing it")
        return paths
    with _one_thread():
        _build(params, paths)
    return paths


def _build(params: dict, paths: dict[str, str]) -> None:
    """Every step of `build_demo` after the cache check; the stamp is written last."""
    start = time.time()
    out_dir = os.path.dirname(paths["stamp"])
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(paths["stamp"]):
        os.remove(paths["stamp"])
    task_kwargs = _task_kwargs(params)

    # Every held-out split is drawn before training and excluded from the demonstrations, and the splits are
    # mutually disjoint: the pool, seed and evaluation prompts are all unseen by the SFT model.
    rng = random.Random(params["seed"])
    taken: set[str] = set()
    eval_prompts = sample_prompts(rng, params["num_eval"], taken, **task_kwargs)
    pool = sample_prompts(rng, params["num_pool"], taken, **task_kwargs)
    # gold ties leave fewer pairs than prompts: draw spare prompts, used in order until enough pairs are labelled
    seed_candidates = sample_prompts(rng, 4 * params["num_seed_pairs"], taken, **task_kwargs)
    eval_pair_candidates = sample_prompts(rng, 4 * params["num_eval_pairs"], taken, **task_kwargs)

    LOG.info(f"building the demo in {out_dir}: {params}")
    tokenizer = build_tokenizer([" ".join(vocabulary(params["num_values"], TASKS[params["task"]]))])
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):  # initialisation and training seed torch; the caller's RNG stays as it was
        model = build_tiny_llama(tokenizer, seed=params["seed"], **params["model"])
        losses = train_sft(model, tokenizer, params, taken)
    train_seconds = time.time() - t0
    LOG.info(f"SFT model trained in {train_seconds:.0f}s; final loss {statistics.fmean(losses[-20:]):.3f}")
    if os.path.exists(paths["sft_model"]):
        shutil.rmtree(paths["sft_model"])
    model.save_pretrained(paths["sft_model"])
    tokenizer.save_pretrained(paths["sft_model"])

    base_seed = params["seed"]
    seed_pairs = sample_labelled_pairs(
        model, tokenizer, seed_candidates, params["num_seed_pairs"], params, base_seed + 2, "seed pairs"
    )
    LOG.info(f"sampling 2 SFT answers for each of the {len(pool)} pool prompts (gold-labelled upper-bound pairs)")
    gold_pairs, pool_samples = sample_gold_pairs(model, tokenizer, pool, params, base_seed + 3)
    eval_pairs = sample_labelled_pairs(
        model, tokenizer, eval_pair_candidates, params["num_eval_pairs"], params, base_seed + 4, "eval pairs"
    )
    LOG.info(f"sampling {params['num_references']} SFT reference answers per evaluation prompt")
    references, _, _ = sample_responses(
        model, tokenizer, eval_prompts, n_samples=params["num_references"], temperature=params["temperature"],
        max_new_tokens=params["max_new_tokens"], seed=base_seed + 5,
    )

    _write_jsonl(paths["seed"], seed_pairs)
    _write_jsonl(paths["prompts"], [{"prompt": p} for p in pool])
    _write_jsonl(paths["eval_prompts"], [{"prompt": p, "references": r} for p, r in zip(eval_prompts, references)])
    _write_jsonl(paths["eval_pairs"], eval_pairs)
    _write_jsonl(paths["gold_pairs"], gold_pairs)

    sft_quality = quality_stats([s["gold"] for s in pool_samples], [s["length"] for s in pool_samples])
    stats = {
        **{f"sft_{key}": value for key, value in sft_quality.items()},
        "sft_final_loss": statistics.fmean(losses[-20:]),
        "pool_tie_fraction": 1 - len(gold_pairs) / len(pool),
        "num_seed_pairs": len(seed_pairs),
        "num_gold_pairs": len(gold_pairs),
        "num_eval_pairs": len(eval_pairs),
        "train_seconds": train_seconds,
        "build_seconds": time.time() - start,
    }
    LOG.info("demo built: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
    with open(paths["stamp"], "w") as f:
        json.dump({**_stamp(params), "stats": stats}, f, indent=2)


def read_build_stats(out_dir: str) -> dict:
    """The quality and timing numbers the build measured (SFT gold mean/std, lengths, tie rate, seconds)."""
    with open(os.path.join(out_dir, STAMP_FILE)) as f:
        return json.load(f)["stats"]


def main(argv: list[str] | None = None) -> None:
    """`PYTHONPATH=examples python -m selfee_demo.build OUT_DIR [--seed N] [--task fixed|variable] [--force]`."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=sorted(TASKS), default="fixed")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    paths = build_demo(args.out_dir, seed=args.seed, force=args.force, task=args.task)
    print(json.dumps({"paths": paths, "stats": read_build_stats(args.out_dir)}, indent=2))


if __name__ == "__main__":
    main()
