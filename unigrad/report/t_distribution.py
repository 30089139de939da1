"""Student's t distribution at any level, for intervals and tests at adjusted confidence levels: the regularized
incomplete beta function (continued fraction, evaluated by the modified Lentz method), the two-sided tail
probability of a t statistic, and the two-sided quantile found by bisection on that tail."""

from __future__ import annotations

import math


def _beta_fraction(x: float, a: float, b: float, terms: int = 300, tiny: float = 1e-300) -> float:
    """The continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2))."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    out = d
    for m in range(1, terms + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            out *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return out


def incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for 0 <= x <= 1 and a, b > 0."""
    if not 0.0 <= x <= 1.0 or a <= 0 or b <= 0:
        raise ValueError(f"incomplete_beta: need 0 <= x <= 1 and a, b > 0, got x={x}, a={a}, b={b}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom: I_{df / (df + t²)}(df / 2, 1 / 2)."""
    if df <= 0:
        raise ValueError(f"t_two_sided_p: need df > 0, got {df}")
    if math.isinf(t):
        return 0.0
    return incomplete_beta(df / (df + t * t), df / 2.0, 0.5)


def t_quantile_two_sided(level: float, df: float) -> float:
    """The t with P(|T| <= t) = `level` (0.95 gives t(0.975, df)), by bisection on `t_two_sided_p`."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"t_quantile_two_sided: level must be in (0, 1), got {level}")
    tail = 1.0 - level
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > tail:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        low, high = (mid, high) if t_two_sided_p(mid, df) > tail else (low, mid)
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2.0
