"""The demo task: sort a list of numbers; prompts, noisy demonstrations, and the programmatic gold score."""

from __future__ import annotations

import random
from collections import Counter

PROMPT_PREFIX = "sort"
NUM_VALUES = 20  # numbers are drawn from 0..19, so the word-level vocabulary stays tiny
NUM_ITEMS = 5  # every prompt holds this many distinct numbers, so a correct answer always has NUM_ITEMS tokens
# A missing, duplicated or invented number is a worse error than an adjacent swap: squaring the coverage makes
# one dropped number (0.8 ** 2 = 0.64) score below one, two and three adjacent swaps (0.9, 0.8, 0.7).
COVERAGE_POWER = 2


def make_prompt(numbers: list[int]) -> str:
    """Render numbers as a user prompt, e.g. `[7, 3, 9]` -> `"sort 7 3 9"`."""
    return " ".join([PROMPT_PREFIX, *map(str, numbers)])


def parse_prompt(prompt: str) -> list[int]:
    """The numbers a prompt asks to sort.

    Raises:
        ValueError: when the prompt is not `sort` followed by integers.
    """
    words = prompt.split()
    if not words or words[0] != PROMPT_PREFIX:
        raise ValueError(f"not a demo prompt (expected 'sort <numbers>'): {prompt!r}")
    return [int(w) for w in words[1:]]


def random_numbers(rng: random.Random, num_items: int = NUM_ITEMS, num_values: int = NUM_VALUES) -> list[int]:
    """`num_items` distinct numbers in random order (distinct: the sorted answer is unique, a repeat is an error)."""
    return rng.sample(range(num_values), num_items)


def sample_prompts(rng: random.Random, n: int, exclude: set[str] | None = None, **kwargs) -> list[str]:
    """`n` distinct prompts that are not in `exclude`; `exclude` is updated so later splits stay disjoint.

    Args:
        rng: the random source.
        n: how many prompts.
        exclude: prompts already taken by another split (updated in place).
        **kwargs: passed to `random_numbers` (`num_items`, `num_values`).

    Returns:
        The prompts, in draw order.
    """
    exclude = set() if exclude is None else exclude
    prompts = []
    while len(prompts) < n:
        prompt = make_prompt(random_numbers(rng, **kwargs))
        if prompt not in exclude:
            exclude.add(prompt)
            prompts.append(prompt)
    return prompts


def count_inversions(values: list[int]) -> int:
    """Pairs `i < j` with `values[i] > values[j]` (O(n^2): answers are a handful of numbers)."""
    return sum(values[i] > values[j] for i in range(len(values)) for j in range(i + 1, len(values)))


def gold_score(prompt: str, response: str) -> float:
    """Programmatic quality of `response` for `prompt`, in [0, 1]: order times coverage.

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


def make_demonstration(prompt: str, rng: random.Random, min_noise: float = 0.0, max_noise: float = 1.0) -> dict:
    """One noisy SFT demonstration in chat format; its noise level is drawn uniformly from [min_noise, max_noise].

    A per-demonstration noise level (rather than one global rate) makes some answers clean and some
    sloppy, so the model trained on them varies in quality from sample to sample.
    """
    answer = noisy_sort(parse_prompt(prompt), rng.uniform(min_noise, max_noise), rng)
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": " ".join(map(str, answer))},
        ]
    }


def vocabulary(num_values: int = NUM_VALUES) -> list[str]:
    """Every word the task uses, one per line, for training the word-level tokenizer."""
    return [PROMPT_PREFIX, *map(str, range(num_values))]
