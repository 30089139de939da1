"""Task samplers: which task, and which of its training prompts, each prompt slot gets.

A sampler owns its random state (a `random.Random`) and any statistics it adapts to, so that a
checkpoint can save it and a resumed run draws exactly the same prompts as an uninterrupted one.

Samplers (`sampler.name` in the config):
- `uniform` (or fixed `task_weights`): constant task probabilities.
- `size`: probability proportional to each task's training pool size.
- `gradient`: proportional to an EMA of ||g_k||^2 (`grad/<task>/sq_norm`), the experiment of arXiv 2510.19178,
  which found it does not help.
- `learning_progress`: proportional to an EMA of |learning gain| (`gain/<task>`).
How the tasks' gradients are then combined is a separate setting (`gradients.combine`: sum, balanced, pcgrad;
`unigrad.diagnostics.task_gradients`).
The adaptive ones mix in a uniform share `exploration` so that no task starves, and stay uniform
until every task has a measurement.

How a step's k slots are dealt (`sampler.draw`):
- `stratified` (default): systematic sampling. One uniform offset u places k evenly spaced points
  (u + i) / k on the cumulative task distribution, so task t gets floor(k p_t) or ceil(k p_t) slots and
  exactly k p_t on average; the slots are then shuffled. The per-step task mix has the least variance
  the probabilities allow, each task's per-step gradient comes from a steadier number of prompts, and
  per-task micro-batches are fuller (fewer learner calls when task gradients are measured).
- `independent`: each slot draws its task independently (multinomial counts), as in the experiment of arXiv 2510.19178.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any


class TaskSampler:
    """Draw (task index, example index) pairs: tasks by `task_probabilities`, examples uniformly.

    Examples are drawn without replacement within each task until its pool is exhausted, then the
    pool is reshuffled (epochs), so every training prompt is seen before any repeats.
    """

    name = "uniform"

    def __init__(self, pool_sizes: list[int], seed: int = 0, weights: list[float] | None = None,
                 names: list[str] | None = None, draw: str = "stratified"):
        if draw not in DRAWS:
            raise ValueError(f"unknown draw {draw!r}; valid: {', '.join(DRAWS)}")
        if not pool_sizes or any(n <= 0 for n in pool_sizes):
            raise ValueError(f"every task needs at least one training prompt, got pool sizes {pool_sizes}")
        if weights is not None:
            if len(weights) != len(pool_sizes) or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"task weights must be {len(pool_sizes)} non-negative numbers with a positive sum")
        self.pool_sizes = list(pool_sizes)
        self.names = list(names) if names is not None else [str(k) for k in range(len(pool_sizes))]
        self.weights = weights
        self.draw = draw
        self.rng = random.Random(seed)
        self._orders: list[list[int]] = [[] for _ in pool_sizes]

    def task_probabilities(self) -> list[float]:
        w = self.weights or [1.0] * len(self.pool_sizes)
        total = sum(w)
        return [x / total for x in w]

    def _next_example(self, task: int) -> int:
        if not self._orders[task]:
            order = list(range(self.pool_sizes[task]))
            self.rng.shuffle(order)
            self._orders[task] = order
        return self._orders[task].pop()

    def update(self, metrics: dict[str, float]) -> None:
        """Feedback from a finished step (its metrics); fixed samplers ignore it."""

    def sample(self, k: int) -> list[tuple[int, int]]:
        probs = self.task_probabilities()
        if self.draw == "independent":
            tasks = self.rng.choices(range(len(probs)), weights=probs, k=k)
        else:
            tasks = systematic_draw(probs, k, self.rng.random())
            self.rng.shuffle(tasks)
        return [(t, self._next_example(t)) for t in tasks]

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rng": self.rng.getstate(), "orders": [list(o) for o in self._orders],
                **self._extra_state()}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") in ("balanced", "pcgrad"):  # checkpoints from when the combinations were samplers
            state = {**state, "name": "uniform"}
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint holds a {state.get('name')!r} sampler, this run uses {self.name!r}")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self._orders = [list(o) for o in state["orders"]]


def systematic_draw(probs: list[float], k: int, u: float) -> list[int]:
    """k task indices by systematic sampling: point (u + i) / k, i = 0..k-1, falls in task t's interval of the
    cumulative distribution `probs`. Task t gets floor(k p_t) or ceil(k p_t) points, k p_t in expectation
    over u ~ U[0, 1); tasks with p_t = 0 get none. Returned in task order."""
    total = sum(probs)
    bounds = [c / total for c in itertools.accumulate(probs)]
    last = max(j for j, p in enumerate(probs) if p > 0)
    bounds[last:] = [1.0] * (len(bounds) - last)  # no slot lost to rounding, none given to a zero-probability task
    tasks, t = [], 0
    for i in range(k):
        point = (u + i) / k
        while point >= bounds[t] and t < len(probs) - 1:
            t += 1
        tasks.append(t)
    return tasks


class SizeProportionalSampler(TaskSampler):
    """Task probability proportional to its training pool size."""

    name = "size"

    def __init__(self, pool_sizes: list[int], seed: int = 0, names: list[str] | None = None,
                 draw: str = "stratified"):
        super().__init__(pool_sizes, seed, weights=[float(n) for n in pool_sizes], names=names, draw=draw)


class _EmaSampler(TaskSampler):
    """Probabilities proportional to an EMA of one per-task metric, mixed with a uniform share."""

    metric = ""  # "grad/{}/sq_norm" or "gain/{}"

    def __init__(self, pool_sizes: list[int], seed: int = 0, names: list[str] | None = None,
                 ema_decay: float = 0.9, exploration: float = 0.1, draw: str = "stratified"):
        super().__init__(pool_sizes, seed, names=names, draw=draw)
        if not 0 <= ema_decay < 1 or not 0 <= exploration <= 1:
            raise ValueError("ema_decay must be in [0, 1) and exploration in [0, 1]")
        self.ema_decay, self.exploration = ema_decay, exploration
        self.ema: list[float | None] = [None] * len(pool_sizes)

    def value(self, x: float) -> float:
        return x

    def update(self, metrics: dict[str, float]) -> None:
        for k, name in enumerate(self.names):
            x = metrics.get(self.metric.format(name))
            if x is None or not math.isfinite(x):
                continue
            x = self.value(x)
            old = self.ema[k]
            self.ema[k] = x if old is None else self.ema_decay * old + (1 - self.ema_decay) * x

    def task_probabilities(self) -> list[float]:
        n = len(self.pool_sizes)
        if any(e is None for e in self.ema) or sum(self.ema) <= 0:
            return [1.0 / n] * n
        total = sum(self.ema)
        return [(1 - self.exploration) * e / total + self.exploration / n for e in self.ema]

    def _extra_state(self) -> dict[str, Any]:
        return {"ema": list(self.ema)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.ema = list(state["ema"])


class GradientProportionalSampler(_EmaSampler):
    """Task probability proportional to an EMA of its squared gradient norm ||g_k||^2."""

    name = "gradient"
    metric = "grad/{}/sq_norm"


class LearningProgressSampler(_EmaSampler):
    """Task probability proportional to an EMA of its |learning gain| (lagged by the gain window)."""

    name = "learning_progress"
    metric = "gain/{}"

    def value(self, x: float) -> float:
        return abs(x)


DRAWS = ["stratified", "independent"]
SAMPLERS = ["uniform", "size", "gradient", "learning_progress"]
WEIGHTED_SAMPLERS = ("uniform",)  # the ones that take fixed task weights


def task_weight_list(weights: dict[str, float], names: list[str] | None = None,
                     sampler: str = "uniform") -> list[float] | None:
    """The one check of `task_weights` ({task name: weight}; unnamed tasks weigh 1.0): finite, >= 0, a sampler
    that takes them and, given the run's task `names`, only those names and a positive total. Returns the weights
    in the order of `names` (None when no weights are set or no names are given)."""
    bad = {k: w for k, w in weights.items() if not w >= 0 or w == float("inf")}
    if bad:
        raise ValueError(f"task weights must be finite and >= 0, got {bad}")
    if weights and sampler not in WEIGHTED_SAMPLERS:
        raise ValueError(f"task_weights cannot be combined with sampler.name={sampler!r}")
    if not weights or names is None:
        return None
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"task_weights names {unknown}, which are not among this run's tasks {names}")
    out = [float(weights.get(name, 1.0)) for name in names]
    if sum(out) <= 0:
        raise ValueError("task_weights: at least one task needs a positive weight")
    return out


@dataclass(frozen=True)
class SamplerChoice:
    """Which sampler deals the prompt slots their tasks, and how (the run configuration's `sampler` section):
    `name` one of SAMPLERS, `draw` "stratified" or "independent", and the adaptive samplers' EMA decay and uniform
    exploration share."""

    name: str = "uniform"
    draw: str = "stratified"
    ema_decay: float = 0.9
    exploration: float = 0.1


def build_sampler(choice: SamplerChoice | str, pool_sizes: list[int], names: list[str], seed: int = 0,
                  weights: list[float] | None = None) -> TaskSampler:
    """The sampler `choice` names (a bare name: that sampler with the default settings); `uniform` takes fixed
    `weights`."""
    if isinstance(choice, str):
        choice = SamplerChoice(choice)
    name, draw, ema_decay, exploration = choice.name, choice.draw, choice.ema_decay, choice.exploration
    if name in WEIGHTED_SAMPLERS:
        return TaskSampler(pool_sizes, seed, weights=weights, names=names, draw=draw)
    if weights is not None:
        raise ValueError(f"task_weights cannot be combined with sampler.name={name!r}")
    if name == "size":
        return SizeProportionalSampler(pool_sizes, seed, names=names, draw=draw)
    if name == "gradient":
        return GradientProportionalSampler(pool_sizes, seed, names, ema_decay, exploration, draw)
    if name == "learning_progress":
        return LearningProgressSampler(pool_sizes, seed, names, ema_decay, exploration, draw)
    raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
