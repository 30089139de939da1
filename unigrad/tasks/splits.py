"""Train/test splits and seeded draws shared by all tasks.

Built-in tasks route each prompt by a hash of its text (`split_of`): the split is a property of
the prompt, so no seed, size or difficulty can put one prompt on both sides. Dataset-backed
tasks without their own splits use `seeded_split` over *distinct* prompts (duplicated rows land
on the same side) with at least one prompt held out. `draw` takes n examples from a fixed pool.
Tasks with a validation split too use `three_way_split_of`, whose test prompts are `split_of`'s.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import TypeVar

from unigrad.tasks.base import Split

T = TypeVar("T")
TEST_PERCENT = 20  # share of a built-in task's prompt space held out for evaluation
VALIDATION_PERCENT = 10  # share held out for validation by tasks with three splits (`three_way_split_of`)


def split_of(prompt: str, test_percent: int = TEST_PERCENT) -> Split:
    """The split a prompt belongs to, fixed by a hash of its text (stable across runs and machines)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100
    return "test" if bucket < test_percent else "train"


def _bucket(prompt: str) -> int:
    """The prompt's hash bucket in 0..99 (the one `split_of` computes)."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100


def three_way_split_of(prompt: str) -> Split:
    """"test", "validation" or "train" by a hash of the prompt's text: test is exactly `split_of`'s test
    (the lowest `TEST_PERCENT` buckets), validation the next `VALIDATION_PERCENT`, train the rest."""
    bucket = _bucket(prompt)
    if bucket < TEST_PERCENT:
        return "test"
    return "validation" if bucket < TEST_PERCENT + VALIDATION_PERCENT else "train"


def seeded_split(prompts: list[str], test_fraction: float, seed: int) -> set[str]:
    """The prompts to hold out: a seeded `test_fraction` of the distinct prompts, independent of
    row order; with two or more distinct prompts neither side is empty."""
    distinct = sorted(set(prompts))
    if len(distinct) < 2 or test_fraction <= 0:
        return set()
    random.Random(f"split/{seed}").shuffle(distinct)
    k = min(len(distinct) - 1, max(1, math.ceil(test_fraction * len(distinct))))  # neither side empty
    return set(distinct[:k])


def draw(pool: list[T], n: int, seed: int, what: str) -> list[T]:
    """`n` items of `pool` in a seeded order, without repeats until the pool is used up (then it
    cycles through fresh permutations); deterministic in (pool, n, seed)."""
    if n > 0 and not pool:
        raise ValueError(f"{what}: no examples to draw from")
    rng = random.Random(f"draw/{seed}")
    out: list[T] = []
    while len(out) < n:
        order = list(range(len(pool)))
        rng.shuffle(order)
        out += [pool[i] for i in order[: n - len(out)]]
    return out
