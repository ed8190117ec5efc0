"""The statistics of a study: mean ± sd over seeds, Welch's t-test, its CI of a difference, Cohen's d.

Pure Python (no SciPy at run time): Student's t distribution through the regularized incomplete beta
function, evaluated by its continued fraction (modified Lentz), and its quantiles by bisection.
Undefined values (one seed, zero spread) are None, never a made-up number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def sd(xs: list[float]) -> float | None:
    """Sample standard deviation (n - 1); None for fewer than two values."""
    if len(xs) < 2:
        return None
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), valid for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail probability P(|T| >= |t|) of Student's t with df degrees of freedom."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t, by bisection on the tail probability."""
    target = 2.0 * (1.0 - p)  # two-sided tail at the quantile
    lo, hi = 0.0, 1.0
    while t_sf2(hi, df) > target:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_sf2(mid, df) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


@dataclass
class Comparison:
    """An ordering's scores against the baseline's: difference of means and its uncertainty."""

    delta: float
    ci95: tuple[float, float] | None  # Welch's interval of the difference
    t: float | None
    df: float | None
    p: float | None  # Welch's two-sided p-value
    d: float | None  # Cohen's d with the pooled sd


def compare(xs: list[float], base: list[float]) -> Comparison:
    """Welch's t-test, its 95% CI and Cohen's d of mean(xs) - mean(base)."""
    delta = mean(xs) - mean(base)
    s1, s0 = sd(xs), sd(base)
    if s1 is None or s0 is None:
        return Comparison(delta, None, None, None, None, None)
    n1, n0 = len(xs), len(base)
    v1, v0 = s1 * s1 / n1, s0 * s0 / n0
    pooled = math.sqrt(((n1 - 1) * s1 * s1 + (n0 - 1) * s0 * s0) / (n1 + n0 - 2))
    d = delta / pooled if pooled > 0 else None
    if v1 + v0 == 0:
        return Comparison(delta, None, None, None, None, d)
    se = math.sqrt(v1 + v0)
    df = (v1 + v0) ** 2 / (v1 * v1 / (n1 - 1) + v0 * v0 / (n0 - 1))
    t = delta / se
    half = t_quantile(0.975, df) * se
    return Comparison(delta, (delta - half, delta + half), t, df, t_sf2(t, df), d)
