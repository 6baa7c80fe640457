"""Demo evaluation: sample from a policy, score with the gold task score, win rate, lengths, judge accuracy."""

from __future__ import annotations

import json
import logging
import os
import statistics
from typing import Iterable, Sequence

from selfee_plugin.config_blocks import GenerationConfig
from selfee_plugin.generation import generate_responses

from .task import gold_score, target_answer

LOG = logging.getLogger(__name__)

# SPA section 4.1 samples at temperature 0.7, top_p 1.0: evaluating with the same settings measures the policy that
# SELFEE's generator actually sees.
TEMPERATURE = 0.7
# A correct answer is NUM_ITEMS words + EOS (fixed mode; at most 6 words in the variable mode); the slack lets an
# over-long answer show up in the length metrics instead of being cut to a "correct" length.
MAX_NEW_TOKENS = 16


def sample_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    n_samples: int = 1,
    temperature: float = TEMPERATURE,
    top_p: float = 1.0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[list[str]], list[list[int]], list[list[bool]]]:
    """Sample `n_samples` chat answers per prompt with SELFEE's own generator (batched, left padded, KV cache).

    Using `selfee_plugin.generation.generate_responses` means the demo's SFT pairs, references and evaluations
    are sampled exactly as a SELFEE round samples.

    Args:
        model: a causal LM (plain or PEFT, any device); its train/eval mode is restored afterwards.
        tokenizer: its tokenizer, with a chat template that has a generation prompt.
        prompts: user messages.
        n_samples: answers per prompt.
        temperature: sampling temperature (> 0).
        top_p: nucleus sampling mass.
        max_new_tokens: generation budget per answer.
        batch_size: prompts per `generate` call (each expands to `batch_size * n_samples` rows).
        seed: sampling seed (the caller's RNG state is left untouched).
        progress: show a tqdm bar.

    Returns:
        `(responses, lengths, finished)`, each `[len(prompts)][n_samples]`: decoded answers without special tokens,
        their length in tokens (EOS excluded), and whether each stopped at EOS (False: cut at `max_new_tokens`).
    """
    gen_cfg = GenerationConfig(
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    messages = [[{"role": "user", "content": p}] for p in prompts]
    generations = generate_responses(model, tokenizer, messages, gen_cfg, n=n_samples, seed=seed, progress=progress)
    if generations.skipped:  # demo prompts are a dozen tokens; a skip means a foreign prompt list
        raise ValueError(f"prompts longer than {gen_cfg.max_prompt_length} tokens: {sorted(generations.skipped)}")
    lengths = [
        [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in answers] for answers in generations.responses
    ]
    return generations.responses, lengths, generations.finished


def quality_stats(golds: Sequence[float], lengths: Sequence[int]) -> dict:
    """Mean/std of the gold score and of the length (tokens), and the share of perfect answers."""
    return {
        "gold_mean": statistics.fmean(golds),
        "gold_std": statistics.pstdev(golds),
        "perfect_fraction": statistics.fmean(g == 1.0 for g in golds),
        "length_mean": statistics.fmean(lengths),
        "length_std": statistics.pstdev(lengths),
    }


def win_rate(scores: Sequence[float], reference_scores: Sequence[float]) -> float:
    """P(policy sample beats reference sample) over all pairs of one prompt's samples: win 1, tie 0.5, loss 0."""
    pairs = [(s > r) + 0.5 * (s == r) for s in scores for r in reference_scores]
    return sum(pairs) / len(pairs)


def evaluate_policy(
    model,
    tokenizer,
    prompts: Sequence[str],
    references: Sequence[Sequence[str]] | None = None,
    n_samples: int = 2,
    temperature: float = TEMPERATURE,
    top_p: float = 1.0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """Sample from the policy and score it with the gold task score.

    Args:
        model: the policy (a causal LM).
        tokenizer: its tokenizer with the chat template.
        prompts: evaluation prompts (`sort ...` or `evens ...`).
        references: per prompt, reference responses to compare against (the demo build stores SFT samples in
            `eval_prompts.jsonl`); None skips the win rate.
        n_samples: samples per prompt.
        temperature: sampling temperature (> 0).
        top_p: nucleus threshold.
        max_new_tokens: generation budget.
        batch_size: prompts per generate call.
        seed: sampling seed.

    Returns:
        A dict: `gold_mean`, `gold_std`, `perfect_fraction` (gold == 1), `win_rate` (vs references;
        only with references), `length_mean`, `length_std` (answer tokens, EOS excluded), `wrong_length_fraction`
        (answers whose word count differs from the right answer's), `eos_fraction` (answers that
        stopped), `distinct_fraction` (distinct responses per prompt / n_samples, averaged), `num_samples`;
        plus `samples`: one dict per response with `prompt`, `response`, `gold`, `length`, `eos`.
    """
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"references has {len(references)} rows for {len(prompts)} prompts")
    responses, lengths, finished = sample_responses(
        model, tokenizer, prompts, n_samples, temperature, top_p, max_new_tokens, batch_size, seed
    )
    samples, wins, distinct = [], [], []
    for i, prompt in enumerate(prompts):
        golds = [gold_score(prompt, r) for r in responses[i]]
        for response, gold, length, stopped in zip(responses[i], golds, lengths[i], finished[i]):
            samples.append({"prompt": prompt, "response": response, "gold": gold, "length": length, "eos": stopped})
        distinct.append(len(set(responses[i])) / n_samples)
        if references is not None:
            wins.append(win_rate(golds, [gold_score(prompt, r) for r in references[i]]))
    metrics = {
        **quality_stats([s["gold"] for s in samples], [s["length"] for s in samples]),
        "wrong_length_fraction": statistics.fmean(
            len(s["response"].split()) != len(target_answer(s["prompt"])) for s in samples
        ),
        "eos_fraction": statistics.fmean(s["eos"] for s in samples),
        "distinct_fraction": statistics.fmean(distinct),
        "num_samples": len(samples),
    }
    if references is not None:
        metrics["win_rate"] = statistics.fmean(wins)
    LOG.info("demo eval: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    metrics["samples"] = samples
    return metrics


def pair_texts(row: dict) -> tuple[str, str, str]:
    """`(prompt, chosen, rejected)` from a pair in Axolotl's `chat_template.default` DPO shape or a flat one.

    Accepted shapes: `{"messages": [{"role": "user", "content": p}], "chosen": {"content": c}, "rejected": {...}}`
    and `{"prompt": p, "chosen": c, "rejected": r}` with strings.
    """
    prompt = row["messages"][-1]["content"] if "messages" in row else row["prompt"]
    chosen, rejected = row["chosen"], row["rejected"]
    chosen = chosen["content"] if isinstance(chosen, dict) else chosen
    rejected = rejected["content"] if isinstance(rejected, dict) else rejected
    return prompt, chosen, rejected


def score_pairs_accuracy(pairs: Iterable[dict]) -> dict:
    """How often a judge's labels agree with the gold score, plus the length-bias diagnostic (longer-chosen share).

    Args:
        pairs: judged pairs (see `pair_texts` for the shapes), each with the judge's chosen and rejected text.

    Returns:
        `accuracy`: fraction of pairs where gold(chosen) > gold(rejected), over pairs whose gold differs (NaN if
        none); `num_pairs`, `num_gold_ties` (left out of the accuracy); `num_unequal_length`,
        `unequal_length_fraction`: pairs whose answers differ in word count; `longer_chosen_fraction`: among
        those, the fraction where the judge chose the longer answer; `gold_prefers_longer_fraction`: among those
        whose gold differs, the fraction where the longer answer has the higher gold;
        `unequal_length_accuracy`: the judge's accuracy on those (NaN where a share has no pairs). A longer-chosen
        share near 1 while gold prefers the longer far less often is the length-bias failure.
    """
    agree = ties = unequal = longer = total = 0
    unequal_labelled = gold_longer = unequal_agree = 0
    for row in pairs:
        prompt, chosen, rejected = pair_texts(row)
        total += 1
        gold_chosen, gold_rejected = gold_score(prompt, chosen), gold_score(prompt, rejected)
        if gold_chosen == gold_rejected:
            ties += 1
        else:
            agree += gold_chosen > gold_rejected
        len_chosen, len_rejected = len(chosen.split()), len(rejected.split())
        if len_chosen != len_rejected:
            unequal += 1
            longer += len_chosen > len_rejected
            if gold_chosen != gold_rejected:
                unequal_labelled += 1
                unequal_agree += gold_chosen > gold_rejected
                # the gold prefers the longer answer when it scores the chosen higher exactly if the chosen is longer
                gold_longer += (gold_chosen > gold_rejected) == (len_chosen > len_rejected)
    nan = float("nan")
    return {
        "accuracy": agree / (total - ties) if total > ties else nan,
        "num_pairs": total,
        "num_gold_ties": ties,
        "num_unequal_length": unequal,
        "unequal_length_fraction": unequal / total if total else nan,
        "longer_chosen_fraction": longer / unequal if unequal else nan,
        "gold_prefers_longer_fraction": gold_longer / unequal_labelled if unequal_labelled else nan,
        "unequal_length_accuracy": unequal_agree / unequal_labelled if unequal_labelled else nan,
    }


def load_policy(path: str, base_model: str | None = None, dtype: str = "float32"):
    """Load a policy saved as a full model dir, or as a PEFT adapter dir over the SFT base (merged for speed).

    Args:
        path: a model directory, or an adapter directory (holds `adapter_config.json`).
        base_model: the base model dir for an adapter; defaults to the adapter config's
            `base_model_name_or_path` (pass it when the base has moved since training).
        dtype: torch dtype name for the weights.

    Returns:
        `(model, tokenizer)`; the tokenizer comes from `path` when it holds one, else from the base.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_config = os.path.join(path, "adapter_config.json")
    if not os.path.exists(adapter_config):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model, AutoTokenizer.from_pretrained(path)

    from peft import PeftModel

    with open(adapter_config) as f:
        base = base_model or json.load(f)["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), path)
    # Merging removes the LoRA indirection from every forward pass; evaluation never trains the adapter.
    model = model.merge_and_unload()
    has_tokenizer = os.path.exists(os.path.join(path, "tokenizer_config.json"))
    return model, AutoTokenizer.from_pretrained(path if has_tokenizer else base)


def read_jsonl(path: str) -> list[dict]:
    """All rows of a JSON Lines file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_eval_set(path: str) -> tuple[list[str], list[list[str]] | None]:
    """`(prompts, references)` from the build's `eval_prompts.jsonl`; references None when rows have none."""
    rows = read_jsonl(path)
    references = [r["references"] for r in rows] if rows and all("references" in r for r in rows) else None
    return [r["prompt"] for r in rows], references
