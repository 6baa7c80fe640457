"""Tests for the demo task: the gold score on hand-built answers, the cached build, and evaluation helpers."""

from __future__ import annotations

import os
import random
import statistics

import pytest
from helpers import _rows

from selfee_demo.task import (
    count_inversions,
    gold_label,
    gold_score,
    make_demonstration,
    noisy_evens,
    noisy_sort,
    parse_prompt,
    sample_prompts,
    target_answer,
)

PROMPT = "sort 7 3 9 1 4"
EVENS = "evens 7 3 19 0 12 8 5"  # right answer: 0 12 8
# Small enough that the build (train, sample, write) takes seconds; the defaults are for the real demo.
SMALL = dict(
    num_pool=48, num_seed_pairs=12, num_eval=16, num_eval_pairs=12, num_references=2, train_steps=150, batch_size=64
)


# --- gold score -------------------------------------------------------------------------------------------------


def test_gold_perfect_sort_is_one_and_reversed_is_zero():
    """Sorted: no inversions, full coverage -> 1. Reversed: all 10 pairs inverted -> order 0 -> 0."""
    assert gold_score(PROMPT, "1 3 4 7 9") == 1.0
    assert gold_score(PROMPT, "9 7 4 3 1") == 0.0
    assert gold_score(PROMPT, "") == 0.0


def test_gold_falls_monotonically_with_adjacent_swaps():
    """Bubble the sorted answer towards reversed, one adjacent swap at a time: each swap adds one inversion of
    the 10 possible, so the score falls by exactly 0.1 per swap, from 1 to 0 in 10 swaps."""
    answer = [1, 3, 4, 7, 9]
    scores = [gold_score(PROMPT, " ".join(map(str, answer)))]
    for end in range(len(answer) - 1, 0, -1):
        for i in range(end):
            answer[i], answer[i + 1] = answer[i + 1], answer[i]
            scores.append(gold_score(PROMPT, " ".join(map(str, answer))))
    assert answer == [9, 7, 4, 3, 1]
    assert scores == pytest.approx([1 - k / 10 for k in range(11)])


@pytest.mark.parametrize(
    "answer, coverage",
    [
        ("1 3 4 7", 4 / 5),  # dropped a number: 4 kept of 5
        ("1 3 4 7 9 9", 5 / 6),  # duplicated: 5 kept of 6 words
        ("1 3 4 7 8", 4 / 5),  # invented 8 in place of 9
        ("1 3 4 7 9 11", 5 / 6),  # extra number
        ("1 3 4 7 9 sort", 5 / 6),  # a non-number word counts as an extra item
    ],
)
def test_gold_penalises_wrong_numbers_and_lengths(answer, coverage):
    """Every answer here is in order (order = 1), so the score is coverage ** 2, below one adjacent swap (0.9)."""
    assert gold_score(PROMPT, answer) == pytest.approx(coverage**2)
    assert gold_score(PROMPT, answer) < gold_score(PROMPT, "3 1 4 7 9")


def test_gold_is_one_exactly_for_the_sorted_input_on_random_answers():
    """Random answers, of any words or of the prompt's numbers (subsets, half of them sorted, some with an extra
    word): gold is 1 exactly when the answer is the sorted input, which happens in some of them."""
    rng = random.Random(0)
    numbers = parse_prompt(PROMPT)
    words = [str(i) for i in range(20)] + ["sort", "<|end|>"]
    perfect = 0
    for _ in range(1000):
        if rng.random() < 0.5:
            answer = [rng.choice(words) for _ in range(rng.randint(0, 9))]
        else:
            answer = [str(n) for n in rng.sample(numbers, rng.randint(3, 5))]
            if rng.random() < 0.5:
                answer.sort(key=int)
            if rng.random() < 0.3:
                answer.insert(rng.randint(0, len(answer)), rng.choice(words))
        is_sorted_input = answer == [str(n) for n in sorted(numbers)]
        perfect += is_sorted_input
        assert (gold_score(PROMPT, " ".join(answer)) == 1.0) == is_sorted_input, answer
    assert 0 < perfect < 1000


@pytest.mark.parametrize(
    "answer, gold",
    [
        ("0 12 8", 1.0),  # the evens in the order given
        ("0 12", 2 / 3),  # missing 8: 2 of 3 right items
        ("0 12 8 5", 3 / 4),  # an extra (odd) item: 3 right of 4 in the union
        ("0 12 8 8", 3 / 4),  # a repeated item is extra too
        ("0 12 8 16", 3 / 4),  # so is an invented one
        ("0 12 8 sort", 3 / 4),  # and a non-number word
        ("0 12 7", 2 / 4),  # missing and extra at once
        ("12 0 8", 2 / 3),  # one of 3 pairs out of the prompt's order
        ("8 12 0", 0.0),  # reversed
        ("3 7", 0.0),  # nothing right
        ("", 0.0),
    ],
)
def test_evens_gold_punishes_missing_and_extra_items(answer, gold):
    """Gold = Jaccard overlap with the right items x order among them: longer or shorter than right scores lower."""
    assert target_answer(EVENS) == [0, 12, 8]
    assert gold_score(EVENS, answer) == pytest.approx(gold)


def test_evens_gold_falls_with_every_extra_item():
    """Appending the prompt's odd numbers one by one to the right answer lowers gold each time: longer is worse."""
    answer = ["0", "12", "8"]
    scores = [gold_score(EVENS, " ".join(answer))]
    for odd in ["7", "3", "19", "5"]:
        answer.append(odd)
        scores.append(gold_score(EVENS, " ".join(answer)))
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)


def test_gold_label_compares_gold_scores_from_the_chat_prompt():
    """`messages` is the chat list (as in the judged pairs); responses may be text or messages; equal gold ties."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": EVENS}]
    assert gold_label(messages, "0 12 8", "0 12 8 5") == "chosen"
    assert gold_label(messages, {"role": "assistant", "content": "0 12 8 5"}, {"content": "0 12 8"}) == "rejected"
    assert gold_label(messages, "0 12 8 5", "0 12 8 7") == "tie"
    assert gold_label([{"role": "user", "content": PROMPT}], "1 3 4 7 9", "3 1 4 7 9") == "chosen"
    assert gold_label(PROMPT, "3 1 4 7 9", "3 1 4 7 9") == "tie"


def test_evens_prompts_and_demonstrations_vary_in_length_both_ways():
    """Prompts always hold an even (no empty right answer); noisy answers are never empty, and are longer and
    shorter than right about equally often, so the SFT data itself has no length preference."""
    rng = random.Random(0)
    prompts = sample_prompts(rng, 300, prefix="evens", num_items=7)
    assert all(prompt.split()[0] == "evens" and len(parse_prompt(prompt)) == 7 for prompt in prompts)
    assert all(target_answer(prompt) for prompt in prompts)
    diffs = [len(noisy_evens(parse_prompt(p), 1.0, rng)) - len(target_answer(p)) for p in prompts]
    longer, shorter = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    assert longer > 50 and shorter > 50 and abs(longer - shorter) < 0.3 * (longer + shorter)
    assert noisy_evens(parse_prompt(EVENS), 0.0, rng) == [0, 12, 8]
    assert make_demonstration(EVENS, rng, 0.5, 1.0)["messages"][1]["content"]


def test_gold_rejects_non_demo_prompts():
    with pytest.raises(ValueError, match="not a demo prompt"):
        gold_score("hello 1 2", "1 2")


def test_noisy_sort_keeps_the_numbers_and_spans_quality():
    """Demonstrations keep length and numbers (only order is noisy); noise 0 is a sort, noise 1 is often not."""
    rng = random.Random(0)
    numbers = parse_prompt(PROMPT)
    assert noisy_sort(numbers, 0.0, rng) == sorted(numbers)
    noisy = [noisy_sort(numbers, 1.0, rng) for _ in range(200)]
    assert all(sorted(a) == sorted(numbers) for a in noisy)
    assert statistics.fmean(count_inversions(a) for a in noisy) > 2
    demo = make_demonstration(PROMPT, rng, 0.5, 1.0)
    assert [m["role"] for m in demo["messages"]] == ["user", "assistant"]


# --- build ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from selfee_demo.build import build_demo

    out = str(tmp_path_factory.mktemp("demo"))
    build_demo(out, seed=0, **SMALL)
    return out


def _assert_pair_shape(row):
    """Axolotl `chat_template.default` DPO shape, labelled by gold (strictly higher gold is chosen)."""
    assert [m["role"] for m in row["messages"]] == ["user"]
    assert row["chosen"]["role"] == row["rejected"]["role"] == "assistant"
    prompt = row["messages"][0]["content"]
    assert gold_score(prompt, row["chosen"]["content"]) > gold_score(prompt, row["rejected"]["content"])


def test_build_writes_every_file_with_the_right_shapes(demo_dir):
    from selfee_demo.build import build_demo

    paths = build_demo(demo_dir, seed=0, **SMALL)  # cached: returns the same paths without rebuilding
    assert all(os.path.exists(p) for p in paths.values())
    seed, pool = _rows(paths["seed"]), _rows(paths["prompts"])
    eval_rows, eval_pairs = _rows(paths["eval_prompts"]), _rows(paths["eval_pairs"])
    gold_pairs = _rows(paths["gold_pairs"])
    assert len(seed) == SMALL["num_seed_pairs"] and len(eval_pairs) == SMALL["num_eval_pairs"]
    assert len(pool) == SMALL["num_pool"] and len(eval_rows) == SMALL["num_eval"]
    assert 0 < len(gold_pairs) <= SMALL["num_pool"]
    for row in seed + eval_pairs + gold_pairs:
        _assert_pair_shape(row)
    assert all(set(r) == {"prompt"} for r in pool)
    assert all(len(r["references"]) == SMALL["num_references"] for r in eval_rows)
    # the splits never share a prompt, and gold pairs label exactly the pool's prompts
    split_prompts = [
        {r["messages"][0]["content"] for r in seed},
        {r["prompt"] for r in pool},
        {r["prompt"] for r in eval_rows},
        {r["messages"][0]["content"] for r in eval_pairs},
    ]
    assert sum(map(len, split_prompts)) == len(set().union(*split_prompts))
    assert {r["messages"][0]["content"] for r in gold_pairs} <= split_prompts[1]


def test_build_is_cached_by_its_stamp(demo_dir):
    from selfee_demo.build import _defaults, _is_built, build_demo

    stamp = os.path.join(demo_dir, "demo_stamp.json")
    before = os.path.getmtime(stamp)
    build_demo(demo_dir, seed=0, **SMALL)
    assert os.path.getmtime(stamp) == before
    assert _is_built(demo_dir, _defaults(seed=0, **SMALL))
    assert not _is_built(demo_dir, _defaults(seed=1, **SMALL))  # other parameters -> rebuild
    with pytest.raises(ValueError, match="unknown build_demo parameter"):
        build_demo(demo_dir, num_pol=3)


def test_variable_build_has_its_own_task_and_stamp(tmp_path_factory):
    """The variable mode builds `evens` prompts and gold-labelled pairs; its SFT answers vary in length."""
    from selfee_demo.build import _defaults, _is_built, build_demo
    from selfee_demo.evaluate import evaluate_policy, load_eval_set, load_policy

    out = str(tmp_path_factory.mktemp("demo_variable"))
    paths = build_demo(out, seed=0, task="variable", **SMALL)
    assert _is_built(out, _defaults("variable", seed=0, **SMALL))
    assert not _is_built(out, _defaults("fixed", seed=0, **SMALL))
    seed, pool = _rows(paths["seed"]), _rows(paths["prompts"])
    assert len(seed) == SMALL["num_seed_pairs"]
    for row in seed:
        _assert_pair_shape(row)
    assert all(r["prompt"].split()[0] == "evens" and len(parse_prompt(r["prompt"])) == 7 for r in pool)
    model, tokenizer = load_policy(paths["sft_model"])
    prompts, references = load_eval_set(paths["eval_prompts"])
    metrics = evaluate_policy(model, tokenizer, prompts, references, n_samples=4, seed=1)
    assert metrics["length_std"] > 0.3 and 0.0 < metrics["gold_mean"] < 1.0


def test_sft_model_samples_vary_in_quality(demo_dir):
    """Measured on the model the build trained: its samples must disagree in gold, or pairs carry no label."""
    from selfee_demo.evaluate import evaluate_policy, load_eval_set, load_policy, win_rate

    model, tokenizer = load_policy(os.path.join(demo_dir, "sft_model"))
    prompts, references = load_eval_set(os.path.join(demo_dir, "eval_prompts.jsonl"))
    metrics = evaluate_policy(model, tokenizer, prompts, references, n_samples=4, seed=1)
    assert metrics["gold_std"] > 0.05
    assert 0.0 < metrics["gold_mean"] < 1.0
    # The win rate is the per-prompt win rate of the returned samples against the stored references, averaged.
    golds = {}
    for sample in metrics["samples"]:
        golds.setdefault(sample["prompt"], []).append(sample["gold"])
    per_prompt = [win_rate(golds[p], [gold_score(p, r) for r in refs]) for p, refs in zip(prompts, references)]
    assert metrics["win_rate"] == pytest.approx(statistics.fmean(per_prompt))
    assert metrics["num_samples"] == 4 * len(prompts) == len(metrics["samples"])
    assert metrics["length_mean"] > 0
    assert metrics["samples"][0].keys() == {"prompt", "response", "gold", "length", "eos"}


def test_sft_labels_cover_answer_and_eos_only(demo_dir):
    """The SFT loss sees the answer tokens and the closing EOS, never the prompt or the chat headers."""
    from transformers import AutoTokenizer

    from selfee_demo.build import _encode_demonstrations

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(demo_dir, "sft_model"))
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "1 3 4 7 9"}]
    ids, _, labels = _encode_demonstrations(tokenizer, [messages])
    assert tokenizer.convert_ids_to_tokens(labels[labels != -100].tolist()) == ["1", "3", "4", "7", "9", "<|end|>"]
    assert ids.shape == labels.shape


# --- evaluation helpers -----------------------------------------------------------------------------------------


def test_score_pairs_accuracy_reports_the_gold_view_of_unequal_length_pairs():
    """Four unequal-length pairs, all longer-chosen; of the three the gold labels (one is a gold tie) it prefers the
    longer in one: the judge's accuracy on them is that same third."""
    from selfee_demo.evaluate import score_pairs_accuracy

    pairs = [
        {"prompt": EVENS, "chosen": "0 12 8 5", "rejected": "0 12 8"},  # gold prefers the shorter
        {"prompt": EVENS, "chosen": "0 12 8", "rejected": "0 12"},  # gold prefers the longer
        {"prompt": EVENS, "chosen": "0 12 8 5", "rejected": "0 12 8 7"},  # equal length: not counted
        {"prompt": EVENS, "chosen": "0 12 8 5 7", "rejected": "12 0 8"},  # gold 3/5 vs 2/3: prefers the shorter
        {"prompt": EVENS, "chosen": "0 12 8 5 7 3", "rejected": "0 12 7"},  # gold 3/6 vs 2/4: a tie
    ]
    result = score_pairs_accuracy(pairs)
    assert result["num_unequal_length"] == 4 and result["longer_chosen_fraction"] == 1.0
    assert result["gold_prefers_longer_fraction"] == pytest.approx(1 / 3)
    assert result["unequal_length_accuracy"] == pytest.approx(1 / 3)


def test_score_pairs_accuracy_counts_agreement_ties_and_length_bias():
    """Pairs: right label, wrong label, gold tie (left out), and a longer-chosen pair the gold disagrees with."""
    from selfee_demo.evaluate import score_pairs_accuracy

    pairs = [
        {"prompt": PROMPT, "chosen": "1 3 4 7 9", "rejected": "3 1 4 7 9"},
        {"messages": [{"role": "user", "content": PROMPT}], "chosen": {"content": "9 7 4 3 1"},
         "rejected": {"content": "1 3 4 7 9"}},
        {"prompt": PROMPT, "chosen": "3 1 4 7 9", "rejected": "1 4 3 7 9"},
        {"prompt": PROMPT, "chosen": "1 3 4 7 9 9", "rejected": "1 3 4 7 9"},
    ]
    result = score_pairs_accuracy(pairs)
    assert result["num_pairs"] == 4 and result["num_gold_ties"] == 1
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert result["unequal_length_fraction"] == pytest.approx(1 / 4)
    assert result["longer_chosen_fraction"] == 1.0


def test_win_rate_counts_ties_as_half():
    from selfee_demo.evaluate import win_rate

    assert win_rate([1.0, 0.5], [0.5]) == pytest.approx(0.75)


def test_load_policy_merges_a_peft_adapter_over_the_sft_base(demo_dir, tmp_path):
    """An adapter dir (adapter_config.json) loads over its recorded base and matches the PEFT model's logits."""
    import torch
    from peft import LoraConfig, get_peft_model

    from selfee_demo.evaluate import load_policy

    base, tokenizer = load_policy(os.path.join(demo_dir, "sft_model"))
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path))
    merged, merged_tokenizer = load_policy(str(tmp_path))
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)
    assert merged_tokenizer.chat_template == tokenizer.chat_template


def test_the_demo_config_passes_axolotl_validation(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """The YAML demo.sh trains with (every `selfee:` key, Axolotl's own keys) validates as `axolotl train` would."""
    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import PluginManager
    from selfee_demo.run import write_config

    paths = {"sft_model": tiny_model_dir, "seed": f"{tiny_data_dir}/seed.jsonl",
             "prompts": f"{tiny_data_dir}/prompts.jsonl", "eval_pairs": f"{tiny_data_dir}/seed.jsonl"}
    monkeypatch.setattr(PluginManager, "_instance", None)
    cfg = load_cfg(write_config(paths, str(tmp_path / "run")))
    assert cfg.selfee["judge"]["batch_tokens"] > 0 and cfg.selfee["rounds"]


def test_variable_mode_has_its_own_data_dir_and_length_columns():
    """The fixed build stays where it was (`data`); the report shows the gold's view of unequal-length pairs."""
    from selfee_demo.run import data_dir_for, format_table

    assert data_dir_for("out", "fixed") == os.path.join("out", "data")
    assert data_dir_for("out", "variable") == os.path.join("out", "data_variable")
    table = format_table([{"policy": "round 1", "gold_mean": 0.5, "length_mean": 4.25, "num_unequal_length": 12,
                           "longer_chosen_fraction": 0.9, "gold_prefers_longer_fraction": 0.25}])
    assert "gold prefers longer" in table and "| 12 | 0.90 | 0.25 |" in table
