"""Train/test splits and seeded draws shared by all tasks.

Built-in tasks route each prompt by a hash of its text (`split_of`): the split is a property of
the prompt, so no seed, size or difficulty can put one prompt on both sides. Dataset-backed
tasks without their own splits use `seeded_split` over *distinct* prompts (duplicated rows land
on the same side) with at least one prompt held out. `draw` takes n examples from a fixed pool.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import TypeVar

from unigrad.tasks.base import Split

T = TypeVar("T")
TEST_PERCENT = 20  # share of a built-in task's prompt space held out for evaluation


def split_of(prompt: str, test_percent: int = TEST_PERCENT) -> Split:
    """The split a prompt belongs to, fixed by a hash of its text (stable across runs and machines)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100
    return "test" if bucket < test_percent else "train"


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
