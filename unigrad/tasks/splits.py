"""Train/validation/test splits and seeded draws shared by all tasks.

Built-in tasks route each prompt by a hash of its text (`three_way_split_of`): the split is a property of
the prompt, so no seed, size or difficulty can put one prompt in two splits. Its test prompts are exactly
`split_of`'s (the two-way split the built-in tasks used before they had a validation split), so held-out
test numbers stay comparable. Dataset-backed tasks without their own splits use `seeded_split` over
*distinct* prompts (duplicated rows land on the same side) with at least one prompt held out, and
`seeded_validation` to carve a validation share out of what is left when asked. `draw` takes n examples
from a fixed pool. Choices (learning rates, schedules, when to stop) are made on "validation"; reported
numbers are on "test".
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import TypeVar

from unigrad.tasks.base import Split

T = TypeVar("T")
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
TEST_PERCENT = 20  # share of a built-in task's prompt space held out for evaluation
VALIDATION_PERCENT = 10  # share of a built-in task's prompt space held out for validation (`three_way_split_of`)


@dataclass(frozen=True)
class SplitFractions:
    """How a dataset's rows that name no split are dealt: a seeded `test_fraction` of their distinct prompts held
    out for test (`seeded_split`), then `validation_fraction` of the rest for validation (`seeded_validation`),
    both drawn from `split_seed`."""

    test_fraction: float = 0.1
    split_seed: int = 0
    validation_fraction: float = 0.0


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


def seeded_validation(prompts: list[str], validation_fraction: float, seed: int) -> set[str]:
    """The prompts to hold out for validation from `prompts` (those left after the test split): a seeded
    `validation_fraction` of the distinct ones (at least one when the fraction is positive), never all of them."""
    distinct = sorted(set(prompts))
    if validation_fraction <= 0:
        return set()
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    if len(distinct) < 2:
        raise ValueError(f"validation_fraction={validation_fraction}: {len(distinct)} distinct training prompt(s) "
                         "left after the test split; too few to hold some out for validation")
    random.Random(f"validation/{seed}").shuffle(distinct)
    k = min(len(distinct) - 1, max(1, math.ceil(validation_fraction * len(distinct))))
    return set(distinct[:k])


def no_validation_error(task: str) -> ValueError:
    """What a task without a validation split says when one is asked of it."""
    return ValueError(f"task {task!r} has no validation split: give its rows split='validation', or hold a share "
                      f"of the training prompts out with the option validation_fraction (e.g. "
                      f"'data.jsonl,validation_fraction=0.1')")


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
