"""Demo evaluation: sample from a policy, score with the gold task score, win rate, lengths, judge accuracy."""

from __future__ import annotations

import json
import os
import statistics
from typing import Iterable, Sequence

from .._logging import get_logger

from .task import gold_score, parse_prompt

LOG = get_logger(__name__)

# SPEC §1 samples at temperature 0.7, top_p 1.0: evaluating with the same settings measures the policy that
# SELFEE's generator actually sees.
TEMPERATURE = 0.7
# A correct answer is NUM_ITEMS words + EOS; the slack lets an over-long answer show up in the length metrics
# instead of being cut to a "correct" length.
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
    desc: str | None = "sampling",
) -> tuple[list[list[str]], list[list[int]]]:
    """Sample `n_samples` chat responses per prompt, batched with left padding and the KV cache.

    Args:
        model: a causal LM (any device); put in eval mode for the call and restored after.
        tokenizer: its tokenizer, with a chat template that has a generation prompt.
        prompts: user messages.
        n_samples: responses per prompt.
        temperature: sampling temperature; 0 means greedy decoding.
        top_p: nucleus sampling threshold.
        max_new_tokens: generation budget per response.
        batch_size: prompts per `generate` call (each expands to `batch_size * n_samples` rows).
        seed: seeds torch's RNG inside a forked RNG state, so the caller's global RNG is untouched.
        desc: tqdm label; None hides the progress bar.

    Returns:
        `(responses, lengths)`, each `[len(prompts)][n_samples]`: decoded text without special tokens, and the
        number of generated tokens before EOS (EOS excluded; `max_new_tokens` when EOS never came).
    """
    import torch
    from tqdm.auto import tqdm

    texts = tokenizer.apply_chat_template(
        [[{"role": "user", "content": p}] for p in prompts], tokenize=False, add_generation_prompt=True
    )
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {
        "do_sample": False
    }
    responses, lengths = [], []
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # left padding keeps every prompt's last token at the end, where generation starts
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            starts = range(0, len(texts), batch_size)
            for start in tqdm(starts, desc=desc, leave=False, **({} if desc else {"disable": True})):
                enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
                out = model.generate(
                    **enc,
                    **sampling,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=n_samples,
                    eos_token_id=eos_id,
                    pad_token_id=pad_id,
                )
                new = out[:, enc["input_ids"].shape[1] :].cpu()  # (B * n_samples, T_new), rows grouped by prompt
                is_eos = new == eos_id
                # tokens before the first EOS; rows that never stop have every generated token counted
                length = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(new[:, 0], new.shape[1]))
                decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
                for i in range(0, len(decoded), n_samples):
                    responses.append([d.strip() for d in decoded[i : i + n_samples]])
                    lengths.append(length[i : i + n_samples].tolist())
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return responses, lengths


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
        prompts: evaluation prompts (`sort ...`).
        references: per prompt, reference responses to compare against (the demo build stores SFT samples in
            `eval_prompts.jsonl`); None skips the win rate.
        n_samples: samples per prompt.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus threshold.
        max_new_tokens: generation budget.
        batch_size: prompts per generate call.
        seed: sampling seed.

    Returns:
        A dict of floats: `gold_mean`, `gold_std`, `perfect_fraction` (gold == 1), `win_rate` (vs references;
        only with references), `length_mean`, `length_std` (generated tokens before EOS), `wrong_length_fraction`
        (answers whose word count differs from the prompt's number count), `eos_fraction` (answers that
        stopped), `distinct_fraction` (distinct responses per prompt / n_samples, averaged), `num_samples`;
        plus `samples`: one dict per response with `prompt`, `response`, `gold`, `length`.
    """
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"references has {len(references)} rows for {len(prompts)} prompts")
    responses, lengths = sample_responses(
        model, tokenizer, prompts, n_samples, temperature, top_p, max_new_tokens, batch_size, seed, desc="evaluating"
    )
    samples, wins, distinct = [], [], []
    for i, prompt in enumerate(prompts):
        golds = [gold_score(prompt, r) for r in responses[i]]
        for response, gold, length in zip(responses[i], golds, lengths[i]):
            samples.append({"prompt": prompt, "response": response, "gold": gold, "length": length})
        distinct.append(len(set(responses[i])) / n_samples)
        if references is not None:
            wins.append(win_rate(golds, [gold_score(prompt, r) for r in references[i]]))
    golds = [s["gold"] for s in samples]
    lens = [s["length"] for s in samples]
    metrics = {
        "gold_mean": statistics.fmean(golds),
        "gold_std": statistics.pstdev(golds),
        "perfect_fraction": statistics.fmean(g == 1.0 for g in golds),
        "length_mean": statistics.fmean(lens),
        "length_std": statistics.pstdev(lens),
        "wrong_length_fraction": statistics.fmean(
            len(s["response"].split()) != len(parse_prompt(s["prompt"])) for s in samples
        ),
        "eos_fraction": statistics.fmean(n < max_new_tokens for n in lens),
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
    """How often a judge's labels agree with the gold score, plus the length-bias diagnostic of SPEC §3.

    Args:
        pairs: judged pairs (see `pair_texts` for the shapes), each with the judge's chosen and rejected text.

    Returns:
        `accuracy`: fraction of pairs where gold(chosen) > gold(rejected), over pairs whose gold differs (NaN if
        none); `num_pairs`, `num_gold_ties` (left out of the accuracy); `unequal_length_fraction`: pairs whose
        answers differ in word count; `longer_chosen_fraction`: among those, the fraction where the judge chose
        the longer answer (NaN if none) — near 1 while gold disagrees is the length-bias failure.
    """
    agree = ties = unequal = longer = total = 0
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
    nan = float("nan")
    return {
        "accuracy": agree / (total - ties) if total > ties else nan,
        "num_pairs": total,
        "num_gold_ties": ties,
        "unequal_length_fraction": unequal / total if total else nan,
        "longer_chosen_fraction": longer / unequal if unequal else nan,
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
