"""The demo tasks: prompts, noisy demonstrations, and the programmatic gold score.

Two modes, named by the prompt's first word so that one gold function scores both:
- fixed (`sort 7 3 19 0 12` -> `0 3 7 12 19`): every right answer has 5 items, so length cannot go wrong unseen;
- variable (`evens 7 3 19 0 12 8 5` -> `0 12 8`, the even numbers in the order given): right answers have 1-6 items,
  and the gold score punishes both missing and extra items, so a policy (or judge) that drifts towards longer
  answers loses gold: the judge's length failure (README, "Round guard and on-policy labels") can be reproduced.
"""

from __future__ import annotations

import random
from collections import Counter

PROMPT_PREFIX = "sort"
EVENS_PREFIX = "evens"
TASKS = {"fixed": PROMPT_PREFIX, "variable": EVENS_PREFIX}  # `--task` name -> the word its prompts start with
NUM_VALUES = 20  # numbers are drawn from 0..19, so the word-level vocabulary stays tiny
NUM_ITEMS = 5  # every prompt holds this many distinct numbers, so a correct answer always has NUM_ITEMS tokens
# 7 numbers hold 1-6 evens (3.5 on average; prompts without one are not drawn): right answers vary in length.
EVENS_ITEMS = 7
# Per-item error rate of a variable-mode demonstration at noise 1: each even is dropped and each odd kept with this
# probability. Chosen before any SELFEE run, from simulated demonstrations at noise U[0.5, 1] (gold 0.65 +- 0.24),
# to spread quality as the fixed mode's SFT samples do (0.68 +- 0.22); misses and extras are equally likely, so the
# demonstrations themselves do not favour longer or shorter answers.
EVENS_ERROR_RATE = 0.3
# A missing, duplicated or invented number is a worse error than an adjacent swap: squaring the coverage makes
# one dropped number (0.8 ** 2 = 0.64) score below one, two and three adjacent swaps (0.9, 0.8, 0.7).
COVERAGE_POWER = 2


def make_prompt(numbers: list[int], prefix: str = PROMPT_PREFIX) -> str:
    """Render numbers as a user prompt, e.g. `[7, 3, 9]` -> `"sort 7 3 9"`."""
    return " ".join([prefix, *map(str, numbers)])


def prompt_task(prompt: str) -> str:
    """The task word a prompt starts with (`sort` or `evens`).

    Raises:
        ValueError: when the prompt starts with neither.
    """
    words = prompt.split()
    if not words or words[0] not in TASKS.values():
        raise ValueError(f"not a demo prompt (expected 'sort <numbers>' or 'evens <numbers>'): {prompt!r}")
    return words[0]


def parse_prompt(prompt: str) -> list[int]:
    """The numbers of a prompt, in the order given.

    Raises:
        ValueError: when the prompt is not `sort` or `evens` followed by integers.
    """
    prompt_task(prompt)
    return [int(w) for w in prompt.split()[1:]]


def target_answer(prompt: str) -> list[int]:
    """The right answer: the numbers sorted (`sort`), or the even ones in the order given (`evens`)."""
    numbers = parse_prompt(prompt)
    return sorted(numbers) if prompt_task(prompt) == PROMPT_PREFIX else [n for n in numbers if n % 2 == 0]


def random_numbers(rng: random.Random, num_items: int = NUM_ITEMS, num_values: int = NUM_VALUES) -> list[int]:
    """`num_items` distinct numbers in random order (distinct: the sorted answer is unique, a repeat is an error)."""
    return rng.sample(range(num_values), num_items)


def sample_prompts(
    rng: random.Random, n: int, exclude: set[str] | None = None, prefix: str = PROMPT_PREFIX, **kwargs
) -> list[str]:
    """`n` distinct prompts that are not in `exclude`; `exclude` is updated so later splits stay disjoint.

    Args:
        rng: the random source.
        n: how many prompts.
        exclude: prompts already taken by another split (updated in place).
        prefix: the task word (`sort` or `evens`).
        **kwargs: passed to `random_numbers` (`num_items`, `num_values`).

    Returns:
        The prompts, in draw order. `evens` prompts hold at least one even number: an empty right answer could
        never be trained on (the plugin never pairs an empty response).
    """
    exclude = set() if exclude is None else exclude
    prompts = []
    while len(prompts) < n:
        prompt = make_prompt(random_numbers(rng, **kwargs), prefix)
        if prefix == EVENS_PREFIX and not target_answer(prompt):
            continue
        if prompt not in exclude:
            exclude.add(prompt)
            prompts.append(prompt)
    return prompts


def count_inversions(values: list[int]) -> int:
    """Pairs `i < j` with `values[i] > values[j]` (O(n^2): answers are a handful of numbers)."""
    return sum(values[i] > values[j] for i in range(len(values)) for j in range(i + 1, len(values)))


def gold_score(prompt: str, response: str) -> float:
    """Programmatic quality of `response` for `prompt`, in [0, 1], for either task (the prompt's first word).

    `sort` prompts: `sort_gold_score`; `evens` prompts: `evens_gold_score`.
    """
    if prompt_task(prompt) == EVENS_PREFIX:
        return evens_gold_score(prompt, response)
    return sort_gold_score(prompt, response)


def sort_gold_score(prompt: str, response: str) -> float:
    """Programmatic quality of a `sort` answer, in [0, 1]: order times coverage.

    order = 1 - inversions / max inversions over the numbers in the answer (1 for a sorted answer, 0 for
    a reversed one; each adjacent swap away from sorted costs the same amount, so the score falls
    smoothly and monotonically with the number of swaps).
    coverage = |answer ∩ input| / max(len(answer), len(input)) as multisets, counting non-number words
    as answer items: it is 1 only when the answer holds exactly the input's numbers, so dropped,
    duplicated, invented and extra numbers, and wrong-length answers, all lose score.

    Args:
        prompt: a demo prompt, `sort 7 3 9 1 4`.
        response: the assistant's answer, e.g. `1 3 4 7 9`.

    Returns:
        `order * coverage ** COVERAGE_POWER`; 1.0 exactly for the sorted input, 0.0 for an empty answer.
    """
    target = parse_prompt(prompt)
    words = response.split()
    numbers = [int(w) for w in words if w.lstrip("-").isdigit()]
    if not numbers or not target:
        return 0.0
    kept = sum((Counter(numbers) & Counter(target)).values())
    coverage = kept / max(len(words), len(target))
    pairs = len(numbers) * (len(numbers) - 1) // 2
    order = 1.0 - count_inversions(numbers) / pairs if pairs else 1.0
    return order * coverage**COVERAGE_POWER


def evens_gold_score(prompt: str, response: str) -> float:
    """Programmatic quality of an `evens` answer, in [0, 1]: overlap times order.

    overlap = |answer ∩ right| / |answer ∪ right| as multisets of words (Jaccard), so a missing even, an extra
    (odd, repeated, invented or non-number) item, and both at once all cost score: an answer that holds the
    right items plus more scores below the right answer, as does one that holds fewer.
    order = 1 - inversions / pairs among the answer's right items, by their position in the prompt (1 in the
    order given; extra items cost overlap only).

    Args:
        prompt: a variable-mode prompt, `evens 7 3 19 0 12 8 5`.
        response: the assistant's answer, e.g. `0 12 8`.

    Returns:
        1.0 exactly for the prompt's even numbers in the order given, 0.0 for an empty answer.
    """
    numbers = parse_prompt(prompt)
    right = Counter(str(n) for n in target_answer(prompt))
    words = Counter(response.split())
    if not words:
        return 0.0
    overlap = sum((words & right).values()) / sum((words | right).values())
    positions = [numbers.index(int(w)) for w in response.split() if w in right]
    pairs = len(positions) * (len(positions) - 1) // 2
    order = 1.0 - count_inversions(positions) / pairs if pairs else 1.0
    return overlap * order


def gold_label(messages, chosen, rejected) -> str:
    """The gold's verdict on a judged pair: `"chosen"`, `"rejected"` or `"tie"` (equal gold scores).

    A programmatic labeller for `selfee.labels` (`labels.function: selfee_demo.task:gold_label`).

    Args:
        messages: the prompt as a chat list (the judged pairs' `messages`; the last user turn is the task), or
            the user prompt as a string.
        chosen: the judge's chosen response (text, or a `{"role", "content"}` message).
        rejected: the judge's rejected response (same forms).
    """
    if isinstance(messages, str):
        prompt = messages
    else:
        prompt = [m["content"] for m in messages if m["role"] == "user"][-1]
    texts = [r["content"] if isinstance(r, dict) else r for r in (chosen, rejected)]
    gold_chosen, gold_rejected = (gold_score(prompt, t) for t in texts)
    if gold_chosen == gold_rejected:
        return "tie"
    return "chosen" if gold_chosen > gold_rejected else "rejected"


def noisy_sort(numbers: list[int], noise: float, rng: random.Random) -> list[int]:
    """A noisy greedy sort: each step takes the smallest remaining number, or with prob. `noise` a random remaining one.

    The demonstrations come from this so that the noise is *local* (one token at a time, as a language model
    makes its errors) and every answer keeps the input's numbers and length: quality varies, length does not.
    """
    remaining = sorted(numbers)
    answer = []
    while remaining:
        index = rng.randrange(len(remaining)) if rng.random() < noise else 0
        answer.append(remaining.pop(index))
    return answer


def noisy_evens(numbers: list[int], noise: float, rng: random.Random) -> list[int]:
    """A noisy left-to-right filter: each even is dropped, and each odd kept, with prob. `noise * EVENS_ERROR_RATE`.

    The noise is local (one item at a time) and changes the answer's length both ways, so the SFT model's
    answers vary in length as well as quality. An empty answer is redrawn: no right answer is empty.
    """
    rate = noise * EVENS_ERROR_RATE
    while True:
        answer = [n for n in numbers if (rng.random() >= rate) == (n % 2 == 0)]
        if answer:
            return answer


def make_demonstration(prompt: str, rng: random.Random, min_noise: float = 0.0, max_noise: float = 1.0) -> dict:
    """One noisy SFT demonstration in chat format; its noise level is drawn uniformly from [min_noise, max_noise].

    A per-demonstration noise level (rather than one global rate) makes some answers clean and some
    sloppy, so the model trained on them varies in quality from sample to sample.
    """
    noisy = noisy_evens if prompt_task(prompt) == EVENS_PREFIX else noisy_sort
    answer = noisy(parse_prompt(prompt), rng.uniform(min_noise, max_noise), rng)
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": " ".join(map(str, answer))},
        ]
    }


def vocabulary(num_values: int = NUM_VALUES, prefix: str = PROMPT_PREFIX) -> list[str]:
    """Every word of one task (its word and the numbers), for training that task's word-level tokenizer."""
    return [prefix, *map(str, range(num_values))]
