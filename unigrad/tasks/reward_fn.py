"""A user's Python reward function, with TRL's calling convention, as a task's verifier.

    def reward_func(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]

`kwargs` carry the examples' columns as lists: `answer`, `demonstration`, `task`, and every key
of `Example.meta` (for file tasks: the file's extra columns; None where an example lacks it).
Load one with "package.module:function" or "path/to/file.py:function".

Unlike the built-in verifiers (in [0, 1]), a user's rewards may be any finite float: the scale
is the user's choice, and advantages normalise it. A reward that cannot be used becomes NaN --
which the trainer counts and skips -- with a logged warning: None (TRL's "not applicable"),
NaN, +-inf or a non-number for one completion; all of them if the function raises. Returning
something that is not a list of the right length is a bug in the function, not a bad sample:
that raises ValueError naming the function.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

from unigrad.tasks.base import Example, Split, Task
from unigrad.user_code import load_object

log = logging.getLogger(__name__)

RewardFunc = Callable[..., list]


def load_reward_function(spec: str) -> RewardFunc:
    """The function named by "module:function" or "path/to/file.py:function"."""
    func = load_object(spec, "reward function")
    if not callable(func):
        raise ValueError(f"reward function {spec!r}: {spec.rpartition(':')[0]} has no function "
                         f"{spec.rpartition(':')[2]!r}")
    return func


def _as_reward(value) -> float:
    """A finite float (from a number, a numpy scalar or a 0-d tensor), or NaN for None, NaN, inf,
    strings and other non-numbers."""
    if value is None or isinstance(value, (str, bytes)):
        return math.nan
    try:
        reward = float(value)
    except (TypeError, ValueError):
        return math.nan
    return reward if math.isfinite(reward) else math.nan


class RewardFunctionTask:
    """`base`'s prompts and answers, scored by a user reward function."""

    def __init__(self, reward_func: RewardFunc | str, base: Task, name: str | None = None, label: str | None = None):
        """`reward_func`: a callable or its "module:function" spec; `label` names it in messages."""
        if isinstance(reward_func, str):
            label, reward_func = label or reward_func, load_reward_function(reward_func)
        self.func = reward_func
        qualname = f"{getattr(reward_func, '__module__', '?')}:{getattr(reward_func, '__qualname__', '?')}"
        self.func_name = label or qualname
        self.base, self.name = base, name or base.name

    def __repr__(self) -> str:
        return f"RewardFunctionTask({self.func_name!r}, base={self.base!r})"

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        examples = self.base.examples(split, n, seed)
        return examples if self.name == self.base.name else [dataclasses.replace(e, task=self.name) for e in examples]

    def verify(self, completions: list[str], examples: list[Example]) -> list[float]:
        n = len(completions)
        if n != len(examples):
            raise ValueError(f"{self.name}: {n} completions for {len(examples)} examples")
        columns = {
            "answer": [e.answer for e in examples],
            "demonstration": [e.demonstration for e in examples],
            "task": [e.task for e in examples],
        }
        for key in dict.fromkeys(k for e in examples for k in e.meta):
            if key not in columns and key not in ("prompts", "completions"):
                columns[key] = [e.meta.get(key) for e in examples]
        self.last_error = None
        try:
            out = self.func(prompts=[e.prompt for e in examples], completions=list(completions), **columns)
        except Exception as e:
            log.warning("reward function %s raised %s: %s; all %d rewards are NaN", self.func_name,
                        type(e).__name__, e, n)
            self.last_error = f"reward function {self.func_name} raised {type(e).__name__}: {e}"
            return [math.nan] * n
        if isinstance(out, (str, bytes)) or not hasattr(out, "__len__") or len(out) != n:
            got = f"{len(out)} values" if hasattr(out, "__len__") else type(out).__name__
            raise ValueError(f"reward function {self.func_name} returned {got} for {n} completions; "
                             f"it must return a list of {n} floats (None where not applicable)")
        rewards = [_as_reward(r) for r in out]
        bad = sum(math.isnan(r) for r in rewards)
        if bad:
            log.warning("reward function %s: %d of %d rewards were None, NaN, infinite or not numbers; "
                        "they are NaN (skipped)", self.func_name, bad, n)
        return rewards
