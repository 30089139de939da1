"""Learning gain per task (arXiv 2510.19178):

    Gain_k(t) = (1/s) sum_{i=1..s} R_k(t+i) - (1/s) sum_{i=1..s} R_k(t-i)

R_k(t) is task k's mean training reward at step t. A task that was not sampled at a step has no
R_k there; each window then averages the steps it has (NaN if it has none). Live, Gain_k(t) is
known only s steps later: `LearningGainTracker.update` at step t returns `gain/<task>` for step
t - s (logged on step t's line). `learning_gain_series` is the post-hoc version over a whole run.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any


def _window_mean(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def learning_gain(rewards: list[float | None], t: int, s: int) -> float:
    """Gain at index t of a reward series (None / NaN = not measured); NaN when a window is empty or
    falls outside the series."""
    if s < 1:
        raise ValueError(f"learning-gain window s must be >= 1, got {s}")
    if t - s < 0 or t + s >= len(rewards):
        return float("nan")
    return _window_mean(rewards[t + 1:t + s + 1]) - _window_mean(rewards[t - s:t])


def learning_gain_series(rewards: list[float | None], s: int) -> list[float]:
    """Gain at every index of the series (NaN near the ends, where a window does not fit)."""
    return [learning_gain(rewards, t, s) for t in range(len(rewards))]


class LearningGainTracker:
    """Live gain with a lag of s steps; its state is checkpointed so a resumed run continues exactly."""

    def __init__(self, names: list[str], s: int = 10):
        if s < 1:
            raise ValueError(f"learning-gain window s must be >= 1, got {s}")
        self.names, self.s = list(names), s
        self._history: dict[str, deque] = {k: deque(maxlen=2 * s + 1) for k in names}
        self._steps: deque = deque(maxlen=2 * s + 1)

    def update(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Record step's `reward/<task>`; return {"gain/<task>": Gain(step - s)} once 2s+1 steps exist."""
        self._steps.append(step)
        for k in self.names:
            self._history[k].append(metrics.get(f"reward/{k}"))
        if len(self._steps) < 2 * self.s + 1:
            return {}
        out = {}
        for k in self.names:
            gain = learning_gain(list(self._history[k]), self.s, self.s)
            if math.isfinite(gain):
                out[f"gain/{k}"] = gain
        return out

    def recent(self, name: str) -> float:
        """Gain over the latest 2s+1 recorded steps (NaN if not enough yet)."""
        hist = list(self._history[name])
        return learning_gain(hist, self.s, self.s) if len(hist) == 2 * self.s + 1 else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"s": self.s, "steps": list(self._steps), "history": {k: list(v) for k, v in self._history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["s"] != self.s or set(state["history"]) != set(self.names):
            raise ValueError("checkpointed learning-gain state does not match this run's tasks or window")
        self._steps = deque(state["steps"], maxlen=2 * self.s + 1)
        self._history = {k: deque(v, maxlen=2 * self.s + 1) for k, v in state["history"].items()}
