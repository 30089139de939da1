"""Task samplers: which task, and which of its training prompts, each prompt slot gets.

A sampler owns its random state (a `random.Random`), so that a checkpoint can save it and a
resumed run draws exactly the same prompts as an uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Any


class TaskSampler:
    """Draw (task index, example index) pairs: tasks by `task_probabilities`, examples uniformly.

    Examples are drawn without replacement within each task until its pool is exhausted, then the
    pool is reshuffled (epochs), so every training prompt is seen before any repeats.
    """

    name = "uniform"

    def __init__(self, pool_sizes: list[int], seed: int = 0, weights: list[float] | None = None):
        if not pool_sizes or any(n <= 0 for n in pool_sizes):
            raise ValueError(f"every task needs at least one training prompt, got pool sizes {pool_sizes}")
        if weights is not None:
            if len(weights) != len(pool_sizes) or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"task weights must be {len(pool_sizes)} non-negative numbers with a positive sum")
        self.pool_sizes = list(pool_sizes)
        self.weights = weights
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

    def sample(self, k: int) -> list[tuple[int, int]]:
        tasks = self.rng.choices(range(len(self.pool_sizes)), weights=self.task_probabilities(), k=k)
        return [(t, self._next_example(t)) for t in tasks]

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rng": self.rng.getstate(), "orders": [list(o) for o in self._orders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint holds a {state.get('name')!r} sampler, this run uses {self.name!r}")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self._orders = [list(o) for o in state["orders"]]
