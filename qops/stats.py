"""Intervals and tests behind the gates' three-way decisions.

A gate check asks whether the quantized model degrades a metric by more than a tolerance ``tol``. Two
one-sided questions are asked of the evidence, each at level ``alpha = (1 - confidence) / 2``:

* **harm** (H0: degradation <= tol). Rejecting it *fails* the check. Slice and fairness checks of one
  target form a family; the harm tests of a family are corrected for multiplicity (Holm by default),
  so the chance that any of them fails a model that is within tolerance on every slice stays <= alpha.
* **within tolerance** (H0: degradation >= tol). Rejecting it *passes* the check. Passing a family
  means passing every member (an intersection-union test), which needs no correction.

When neither is rejected the check is *inconclusive*: the interval straddles the tolerance.

Paired binary outcomes (accuracy, top-1 agreement: each row right or wrong for both models) use Tango's
score interval for the difference of paired proportions (Tango 1998, Stat Med 17:891), which depends on
the discordant rows (``worse``: right in FP32, wrong quantized; ``better``: the reverse) and the row
count, and stays honest at 0 or 1 discordant rows where a bootstrap collapses to a point. Other metrics
(F1, AUC, errors, KL, fairness differences) use the paired bootstrap's standard error with a normal
interval, which keeps its meaning at the small tail levels a multiplicity correction asks for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist


def norm_cdf(x: float) -> float:
    return NormalDist().cdf(x)


def norm_ppf(p: float) -> float:
    """Inverse of the standard normal CDF (``statistics.NormalDist``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability {p} outside (0, 1)")
    return NormalDist().inv_cdf(p)


# --- paired binary outcomes: Tango's score statistic -------------------------------------------------

def tango_z(worse: int, better: int, n: int, delta: float) -> float:
    """Score statistic for H0: (worse - better) / n == delta (positive: FP32 right more often)."""
    if n <= 0:
        return 0.0
    delta = min(max(delta, -1 + 1e-12), 1 - 1e-12)
    a = 2.0 * n
    b = -worse - better + (2.0 * n - worse + better) * delta
    c = -better * delta * (1 - delta)
    q21 = (math.sqrt(max(b * b - 4 * a * c, 0.0)) - b) / (2 * a)
    var = n * (2 * q21 + delta * (1 - delta))
    diff = worse - better - n * delta
    if var <= 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / math.sqrt(var)


def tango_interval(worse: int, better: int, n: int, confidence: float) -> tuple[float, float]:
    """Two-sided score interval for the paired difference (worse - better) / n."""
    if n <= 0:
        return (-1.0, 1.0)
    z = norm_ppf(1 - (1 - confidence) / 2)
    point = (worse - better) / n

    def solve(lo: float, hi: float, target: float) -> float:
        # tango_z decreases in delta; find delta with tango_z == target
        for _ in range(80):
            mid = (lo + hi) / 2
            if tango_z(worse, better, n, mid) > target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = -1.0 if tango_z(worse, better, n, -1 + 1e-12) <= z else solve(-1.0, point, z)
    high = 1.0 if tango_z(worse, better, n, 1 - 1e-12) >= -z else solve(point, 1.0, -z)
    return (min(low, point), max(high, point))


def tango_p_harm(worse: int, better: int, n: int, tol: float) -> float:
    """One-sided p-value of H0: degradation <= tol (small: evidence that the drop exceeds tol)."""
    return 1.0 - norm_cdf(tango_z(worse, better, n, tol))


def tango_p_within(worse: int, better: int, n: int, tol: float) -> float:
    """One-sided p-value of H0: degradation >= tol (small: evidence that the drop is within tol)."""
    if tol >= 1:
        return 0.0
    return norm_cdf(tango_z(worse, better, n, tol))


def wilson_interval(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (absolute bounds such as ``agreement >= 0.97``)."""
    if n <= 0:
        return (0.0, 1.0)
    z = norm_ppf(1 - (1 - confidence) / 2)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def detectable_flips(n: int, tol: float, alpha: float) -> int | None:
    """Fewest rows turned wrong (none turned right) for which the harm test at level ``alpha`` rejects:
    the smallest degradation this many rows can show to exceed ``tol``. None: not even all n."""
    if n <= 0:
        return None
    lo, hi = 0, n
    if tango_p_harm(n, 0, n, tol) > alpha:
        return None
    while lo < hi:  # p_harm decreases as more rows turn wrong
        mid = (lo + hi) // 2
        if tango_p_harm(mid, 0, n, tol) <= alpha:
            hi = mid
        else:
            lo = mid + 1
    return lo


def rows_to_protect(tol: float, alpha: float) -> int | None:
    """Rows a slice needs so that a quantized model with no changed predictions can be shown within ``tol``
    (the score interval's upper end with 0 discordant rows is z^2 / (n + z^2))."""
    if tol <= 0:
        return None
    if tol >= 1:
        return 1
    z = norm_ppf(1 - alpha)
    return max(1, math.ceil(z * z * (1 - tol) / tol - 1e-9))


# --- normal approximation from a paired bootstrap's standard error ------------------------------------

def normal_p_harm(degradation: float, se: float, tol: float) -> float:
    if se <= 0:
        return 0.0 if degradation > tol + 1e-12 else 1.0
    return 1.0 - norm_cdf((degradation - tol) / se)


def normal_p_within(degradation: float, se: float, tol: float) -> float:
    if se <= 0:
        return 0.0 if degradation <= tol + 1e-12 else 1.0
    return norm_cdf((degradation - tol) / se)


# --- multiplicity ------------------------------------------------------------------------------------

@dataclass
class Adjusted:
    rejected: bool
    level: float  # the level this hypothesis was compared with


def adjust(p_values: list[float | None], alpha: float, method: str) -> list[Adjusted | None]:
    """Familywise correction of one-sided harm tests: ``holm`` (step-down), ``bonferroni`` or ``none``.
    ``None`` entries (no evidence) are not tested and do not count in the family size."""
    tested = [(i, p) for i, p in enumerate(p_values) if p is not None]
    m = len(tested)
    out: list[Adjusted | None] = [None] * len(p_values)
    if method == "none":
        for i, p in tested:
            out[i] = Adjusted(p <= alpha, alpha)
        return out
    if method == "bonferroni":
        for i, p in tested:
            out[i] = Adjusted(p <= alpha / m, alpha / m)
        return out
    if method != "holm":
        raise ValueError(f"unknown multiplicity method {method!r}")
    still = True
    for rank, (i, p) in enumerate(sorted(tested, key=lambda t: t[1])):
        level = alpha / (m - rank)
        still = still and p <= level
        out[i] = Adjusted(still, level)
    return out
