"""Statistics over seeds for the studies: a mean with its 95% confidence interval, the paired per-prompt standard
error of a difference, and what counts as a collapse (against the study's control arm).

Two sources of noise are reported apart:
- **seeds** (training noise: sampling, data order, initialisation of what the seed initialises): the mean over
  seeds with a Student-t 95% interval, mean ± t(0.975, n - 1) · sd / √n;
- **prompts** (which held-out prompts were drawn): the paired standard error of a per-prompt difference, the
  correctness of each test prompt averaged over an arm's seeds, compared prompt by prompt with another arm (or the
  start checkpoint) on the same prompts (`unigrad.eval.paired_gain` on the seed-averaged correctness).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from unigrad.eval import paired_gain

# Student t quantiles t(0.975, df) for df = 1..30 (standard tables); above 30 the Cornish-Fisher expansion below.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError(f"t975: need at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = _Z975, float(df)  # Abramowitz & Stegun 26.7.5
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% t interval) over the finite values; half-width NaN with fewer than two."""
    xs = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    if len(xs) < 2:
        return xs[0], float("nan")
    return statistics.fmean(xs), t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def seed_averaged(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-prompt correctness averaged over seeds: {task: {"correct": [mean over seeds per prompt]}} from several
    `evaluate(..., per_prompt=True)` results on the same prompts."""
    if not results:
        raise ValueError("seed_averaged: no results")
    tasks = [t for t in results[0] if t != "mean"]
    out: dict[str, Any] = {}
    for t in tasks:
        rows = [r[t]["correct"] for r in results]
        if len({len(r) for r in rows}) != 1:
            raise ValueError(f"task {t!r}: the seeds were evaluated on different numbers of prompts")
        out[t] = {"correct": [sum(col) / len(col) for col in zip(*rows, strict=True)]}
    out["mean"] = {}
    return out


def paired_difference(arm: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(difference of mean pass@1, its paired per-prompt standard error): `arm`'s seeds against `other`'s (or the
    start checkpoint's one evaluation), each prompt's correctness averaged over seeds first."""
    return paired_gain(seed_averaged(other), seed_averaged(arm))


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` finite values at each position (NaN until one is seen)."""
    out, recent = [], []
    for x in values:
        if x is not None and math.isfinite(x):
            recent = (recent + [float(x)])[-window:]
        out.append(statistics.fmean(recent) if recent else float("nan"))
    return out


def collapsed(run: Sequence[float], control_runs: Sequence[Sequence[float]], window: int = 10,
              fraction: float = 0.5) -> bool:
    """A run collapsed when its training reward, as a trailing mean over up to `window` steps counted from step 1
    (no grace period: the first steps average over fewer values), ends below `fraction` of the control arm's at the
    same step (the mean over the control's seeds of their trailing means). A decline the control shares is not a
    collapse; a run that crashes at once is. The comparison is at the run's last logged step (a run shorter than
    the control, stopped early, is compared at the step it stopped); a control at or below zero there admits no
    collapse. ValueError when there are no control runs (a study without a declared control has no collapse
    verdict)."""
    if not control_runs:
        raise ValueError("collapsed: no control runs; declare the study's `control` arm to get a collapse verdict")
    own = moving_average(run, window)
    last = max((i for i, x in enumerate(own) if math.isfinite(x)), default=None)
    if last is None:
        return False
    at_step = [c[last] for c in (moving_average(r, window) for r in control_runs)
               if last < len(c) and math.isfinite(c[last])]
    if not at_step:
        return False
    reference = statistics.fmean(at_step)
    return reference > 0 and own[last] < fraction * reference


def series(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    """One metric per step from metrics.jsonl rows (NaN where the step did not log it)."""
    out = []
    for r in rows:
        v = r.get(key)
        out.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan"))
    return out
