"""What a task is: prompts with reference answers and demonstrations, and a verifier.

A task produces `Example`s from a seeded generator (built-in tasks) or a dataset (user tasks),
in two disjoint splits: "train" and "test" (held out); some tasks (reasoning_gym_task.py) also hold
out a third, "validation". Its verifier scores a completion against an example with a reward in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Split = Literal["train", "validation", "test"]  # "validation" only where a task offers it


@dataclass(frozen=True)
class Example:
    prompt: str  # the user message, without any chat template
    answer: str  # the reference answer the verifier checks against
    demonstration: str | None  # a correct completion in the expected response format (SFT / HPT)
    task: str  # name of the task that produced it
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # e.g. hidden tests


@runtime_checkable
class Task(Protocol):
    name: str

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        """`n` examples of `split`, deterministic in (split, n, seed); train and test never overlap."""
        ...

    def verify(self, completions: list[str], examples: list[Example]) -> list[float]:
        """Reward for each completion (batched so that sandboxes can run in parallel): in [0, 1] for the
        built-in verifiers; any finite float from a user reward function, or NaN where it gave no usable
        reward (the trainer counts and skips NaN)."""
        ...


def is_multi_turn(task: Any) -> bool:
    """Whether `task` is a multi-turn task (unigrad.environments: it sets `multi_turn = True` and runs episodes)."""
    return bool(getattr(task, "multi_turn", False))
