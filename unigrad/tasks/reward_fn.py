"""A user's Python reward function, with TRL's calling convention, as a task's verifier.

    def reward_func(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]

`kwargs` carry the examples' columns as lists: `answer`, `demonstration`, `task`, and every key
of `Example.meta` (for file tasks: the file's extra columns; None where an example lacks it).
Load one with "package.module:function" or "path/to/file.py:function".

Unlike the built-in verifiers (in [0, 1]), a user's rewards may be any finite float: the scale
is the user's choice, and advantages normalise it. A reward that cannot be used becomes NaN --
which the trainer counts and skips -- with a logged warning: None (TRL's "not applicable"),
NaN, +-inf or a string for one completion. If the function raises, it is called again once per
completion, so that only the completions it raises on are NaN (a function that always raises: all
of them). Returning anything but a list (tuple, array, tensor) of one number per completion -- a
dict, a scalar, a list of the wrong length, a list of lists or dicts -- is a bug in the function,
not a bad sample: that raises `VerifierError` (a ValueError) naming the function, what it returned
and what it must return.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping

from unigrad.tasks.base import Example, Split, Task
from unigrad.tasks.guard import VerifierError
from unigrad.user_code import load_object

log = logging.getLogger(__name__)

RewardFunc = Callable[..., list]


def load_reward_function(spec: str) -> RewardFunc:
    """The function named by "module:function" or "path/to/file.py:function"."""
    func = load_object(spec, "reward function")
    if not callable(func):
        where, _, name = spec.rpartition(":")
        raise ValueError(f"reward function {spec!r}: {where} has {name!r}, but it is a {type(func).__name__} "
                         f"({func!r:.40}), not a function; name a function "
                         f"def {name}(prompts, completions, **kwargs) -> list[float]")
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
        prompts, columns = [e.prompt for e in examples], _columns(examples)
        self.last_error = None
        try:
            rewards = self._call(prompts, list(completions), columns)
        except VerifierError:
            raise
        except Exception as e:
            rewards = self._one_at_a_time(prompts, list(completions), columns, e)
        bad = sum(math.isnan(r) for r in rewards)
        if bad:
            log.warning("reward function %s: %d of %d rewards were None, NaN, infinite, not numbers or raised; "
                        "they are NaN (skipped)", self.func_name, bad, n)
        return rewards

    def _call(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> list[float]:
        """The function's rewards for these completions (a `VerifierError` when its return is not one number each)."""
        out = self.func(prompts=prompts, completions=completions, **columns)
        return [_as_reward(r) for r in checked_return(out, len(completions), self.func_name)]

    def _one_at_a_time(self, prompts: list[str], completions: list[str], columns: dict[str, list],
                       first: Exception) -> list[float]:
        """After the batch raised `first`: each completion on its own, so that only those it raises on are NaN."""
        rewards, raised = ([math.nan], 1) if len(completions) == 1 else ([], 0)
        for i in range(len(completions)) if len(completions) > 1 else ():
            one = {k: v[i:i + 1] for k, v in columns.items()}
            try:
                rewards += self._call(prompts[i:i + 1], completions[i:i + 1], one)
            except VerifierError:
                raise
            except Exception:
                rewards.append(math.nan)
                raised += 1
        if raised:  # what the trainer reports when a task's rewards stay unscorable
            self.last_error = f"reward function {self.func_name} raised {type(first).__name__}: {first}"
        log.warning("reward function %s raised %s: %s; scored one completion at a time, it raised on %d of %d (NaN)",
                    self.func_name, type(first).__name__, first, raised, len(completions))
        return rewards


def _columns(examples: list[Example]) -> dict[str, list]:
    """The keyword arguments a reward function gets: the examples' columns as lists."""
    columns = {
        "answer": [e.answer for e in examples],
        "demonstration": [e.demonstration for e in examples],
        "task": [e.task for e in examples],
    }
    for key in dict.fromkeys(k for e in examples for k in e.meta):
        if key not in columns and key not in ("prompts", "completions"):
            columns[key] = [e.meta.get(key) for e in examples]
    return columns


def checked_return(out, n: int, name: str) -> list:
    """`out` as a list of n items, or a `VerifierError` saying what the function returned and what it must return:
    a list (tuple, array, tensor) of n numbers, one per completion in order, None where not applicable."""
    expected = f"it must return a list of {n} floats, one per completion in order (None where not applicable)"
    if isinstance(out, Mapping):
        keys = ", ".join(repr(k) for k in list(out)[:3]) + (", ..." if len(out) > 3 else "")
        raise VerifierError(f"reward function {name} returned a {type(out).__name__} (keys {keys}) for {n} "
                            f"completions; {expected}, not a mapping: return the values in completion order")
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):  # a numpy array or a tensor
        out = out.tolist()
    if not isinstance(out, (list, tuple)) or len(out) != n:
        got = f"{len(out)} values" if isinstance(out, (list, tuple)) else f"a {type(out).__name__}"
        raise VerifierError(f"reward function {name} returned {got} for {n} completions; {expected}")
    for i, item in enumerate(out):
        if isinstance(item, (Mapping, list, tuple, set, frozenset)):
            raise VerifierError(f"reward function {name} returned a list whose item {i} is a {type(item).__name__} "
                                f"({item!r:.60}); {expected}, each a number")
    return list(out)
