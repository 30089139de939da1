"""Holm's step-down adjustment over the comparisons one study makes (Holm 1979, "A simple sequentially rejective
multiple test procedure"), on seed-paired differences.

Each comparison is a list of per-seed differences (arm minus other, seed by seed). Its test is the one-sample t
test of mean zero (n - 1 degrees of freedom). With m comparisons sorted by p-value p(1) <= ... <= p(m), Holm
rejects the i-th while p(i) <= alpha / (m - i + 1) and every earlier one was rejected; the first that fails and
all after it are kept. The adjusted p-value is the running maximum of (m - i + 1) · p(i), capped at 1.

The interval reported with each comparison is the t interval at the level Holm tests it at: 1 - alpha / (m - i + 1)
for a rejected comparison, and for the first kept one and every one after it the level of the first kept one.
Such an interval excludes zero exactly when Holm rejects (its p-value is below the level's tail). These are the
intervals that agree with Holm's decisions; they are not simultaneous-coverage intervals.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from unigrad.report.t_distribution import t_quantile_two_sided, t_two_sided_p


@dataclass(frozen=True)
class PairedTest:
    """The one-sample t test of per-seed differences: mean, standard error, degrees of freedom, two-sided p."""
    n: int
    mean: float
    se: float
    p: float

    def half_width(self, level: float) -> float:
        """Half-width of the two-sided t interval at `level` (NaN with fewer than two seeds)."""
        if self.n < 2:
            return float("nan")
        return t_quantile_two_sided(level, self.n - 1) * self.se


def paired_t(differences: Sequence[float]) -> PairedTest:
    """The test of mean zero over the finite per-seed differences. With no spread: p = 1 when every difference is
    zero (identical runs), 0 otherwise; with fewer than two seeds p is NaN (nothing to test)."""
    xs = [float(x) for x in differences if x is not None and math.isfinite(x)]
    if not xs:
        raise ValueError("paired_t: no finite differences")
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return PairedTest(1, mean, float("nan"), float("nan"))
    se = statistics.stdev(xs) / math.sqrt(len(xs))
    if se == 0:
        return PairedTest(len(xs), mean, 0.0, 1.0 if mean == 0 else 0.0)
    return PairedTest(len(xs), mean, se, t_two_sided_p(mean / se, len(xs) - 1))


@dataclass(frozen=True)
class Adjusted:
    """One comparison after Holm's adjustment over its study's comparisons."""
    name: str
    test: PairedTest
    rank: int  # 1 = the smallest p-value
    p_adjusted: float
    level: float  # the confidence level Holm tests this comparison at
    rejected: bool  # the adjusted interval excludes zero

    def half_width(self, adjusted: bool = True) -> float:
        return self.test.half_width(self.level if adjusted else 0.95)


@dataclass(frozen=True)
class HolmStep:
    """Holm's decision on one p-value among m."""
    rank: int  # 1 = the smallest p-value
    p_adjusted: float
    level: float  # the confidence level the comparison is tested at
    rejected: bool


def holm_adjust(p_values: Sequence[float], alpha: float = 0.05) -> list[HolmStep]:
    """Holm's step-down decisions for the p-values, in the order given. A NaN p-value (nothing to test) is ranked
    last, counted in m and never rejected."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"holm: alpha must be in (0, 1), got {alpha}")
    m = len(p_values)
    order = sorted(range(m), key=lambda k: (math.isnan(p_values[k]), p_values[k]))
    out: dict[int, HolmStep] = {}
    running, kept_level = 0.0, None
    for i, k in enumerate(order, start=1):
        p = p_values[k]
        running = max(running, 1.0 if math.isnan(p) else min(1.0, (m - i + 1) * p))
        level = 1.0 - alpha / (m - i + 1)
        if kept_level is None and not p <= alpha / (m - i + 1):
            kept_level = level
        out[k] = HolmStep(i, running, kept_level or level, kept_level is None)
    return [out[k] for k in range(m)]


def holm(comparisons: dict[str, Sequence[float]], alpha: float = 0.05) -> list[Adjusted]:
    """Holm's adjustment over {name: per-seed differences}, in the order given. A comparison with fewer than two
    seeds cannot be tested: it is counted in m and never rejected."""
    tests = {name: paired_t(d) for name, d in comparisons.items()}
    steps = holm_adjust([t.p for t in tests.values()], alpha)
    return [Adjusted(name, t, h.rank, h.p_adjusted, h.level, h.rejected)
            for (name, t), h in zip(tests.items(), steps, strict=True)]
