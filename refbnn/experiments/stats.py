"""Small, exact statistics for the studies: Student-t quantiles, paired differences, tests.

No SciPy. The Student-t distribution function for an integer number of degrees of freedom ``df`` has
a closed form (Abramowitz & Stegun 26.7.3 / 26.7.4; with ``theta = atan(t / sqrt(df))``)::

    df odd:  F(t) = 1/2 + (theta + sin(theta) cos(theta) * S_odd) / pi,   S_odd = 0 for df = 1,
             S_odd = 1 + (2/3) c^2 + (2*4)/(3*5) c^4 + ... + (2*4*...*(df-3))/(3*5*...*(df-2)) c^(df-3)
    df even: F(t) = 1/2 + sin(theta) * S_even / 2,
             S_even = 1 + (1/2) c^2 + (1*3)/(2*4) c^4 + ... + (1*3*...*(df-3))/(2*4*...*(df-2)) c^(df-2)

(``c = cos(theta)``), evaluated in float64 (:func:`t_cdf`); :func:`t_quantile` inverts it by
bisection to the last bit. Every study statistic is computed from per-seed values paired by seed
(:func:`paired`): the mean difference, its Student-t confidence interval and p-value
(``n - 1`` degrees of freedom), the exact two-sided sign test and the exact two-sided sign-flip
permutation test of the mean difference.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

#: the largest ``n`` for which :func:`permutation_p` enumerates all ``2**n`` sign flips
MAX_EXACT_PERMUTATION = 22


def _check_df(df) -> int:
    if isinstance(df, bool) or not isinstance(df, int | np.integer) or df < 1:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df!r}")
    return int(df)


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer ``df >= 1`` (module docstring; float64)."""
    df = _check_df(df)
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = (1.0, 1.0) if df > 1 else (0.0, 0.0)
        for k in range(2, df - 1, 2):  # ratios 2/3, 4/5, ..., (df-3)/(df-2)
            term *= c2 * k / (k + 1)
            total += term
        return 0.5 + (theta + s * math.cos(theta) * total) / math.pi
    total, term = 1.0, 1.0
    for k in range(1, df - 2, 2):  # ratios 1/2, 3/4, ..., (df-3)/(df-2)
        term *= c2 * k / (k + 1)
        total += term
    return 0.5 + s * total / 2


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with integer ``df >= 1``, ``0 < p < 1``: the ``t`` with
    ``t_cdf(t, df) = p``, found by bisection (monotone, to adjacent floats)."""
    df = _check_df(df)
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            return math.inf
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return hi


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the two-sided Student-t ``level`` confidence interval of the mean of
    ``values`` (``mean -+ t_{(1+level)/2, n-1} * sd / sqrt(n)``, sd with ddof = 1); ``low`` and
    ``high`` are NaN for fewer than 2 values."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError("mean_ci needs a non-empty list of numbers")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + level / 2, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return mean, mean - half, mean + half


def t_test_p(values) -> float:
    """Two-sided p-value of the one-sample t-test of mean 0 (``n - 1`` df); NaN for fewer than 2
    values; 1.0 when every value is 0, 0.0 when they are all equal and non-zero."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return math.nan
    mean, sd = float(v.mean()), float(v.std(ddof=1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    t = abs(mean) / (sd / math.sqrt(len(v)))
    return min(1.0, 2.0 * (1.0 - t_cdf(t, len(v) - 1)))


def sign_test_p(values) -> float:
    """Exact two-sided sign test of median 0: zeros are dropped; with ``k`` positive of ``n``,
    ``p = min(1, 2 * P(X <= min(k, n - k)))`` for ``X ~ Binomial(n, 1/2)``; 1.0 when all are 0."""
    v = np.asarray(values, dtype=np.float64)
    pos, neg = int((v > 0).sum()), int((v < 0).sum())
    n = pos + neg
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(pos, neg) + 1))
    return min(1.0, 2.0 * tail / 2 ** n)


def permutation_p(values) -> float:
    """Exact two-sided sign-flip permutation test of mean 0 for paired differences: the share of
    the ``2**n`` sign assignments whose ``|sum|`` reaches the observed ``|sum|`` (ties within 1e-9
    relative count as reaching it). The smallest possible value is ``2 / 2**n``. Refuses
    ``n > MAX_EXACT_PERMUTATION``."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        raise ValueError("permutation_p needs at least one value")
    if n > MAX_EXACT_PERMUTATION:
        raise ValueError(f"an exact permutation test of {n} values needs 2**{n} sign flips; at most "
                         f"{MAX_EXACT_PERMUTATION} values")
    observed = abs(float(v.sum()))
    tol = 1e-9 * max(float(np.abs(v).sum()), 1e-300)
    hits = 0
    head, tail = v[: min(n, 12)], v[min(n, 12):]
    # all sums of the head's sign flips at once, then loop over the tail's
    head_sums = np.array([0.0])
    for x in head:
        head_sums = np.concatenate([head_sums + x, head_sums - x])
    for signs in itertools.product((1.0, -1.0), repeat=len(tail)):
        shift = float(np.dot(signs, tail)) if len(tail) else 0.0
        hits += int((np.abs(head_sums + shift) >= observed - tol).sum())
    return hits / 2 ** n


@dataclass
class Comparison:
    """``a - b`` paired by seed: per-seed differences, their mean, the Student-t CI of the mean,
    the paired t-test, sign test and permutation test p-values, and whether the CI excludes 0."""

    a: str
    b: str
    seeds: list
    differences: list
    mean: float
    low: float
    high: float
    level: float
    sd: float
    wins: int            # seeds with a > b
    losses: int          # seeds with a < b
    t_p: float
    sign_p: float
    permutation_p: float
    significant: bool    # the CI excludes 0 (equivalently t_p < 1 - level)

    def to_dict(self) -> dict:
        """The fields as JSON-able values (NaN, undefined for one seed, becomes ``None``)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in asdict(self).items()}


def paired(a_name: str, a: dict, b_name: str, b: dict, level: float = 0.95) -> Comparison:
    """Compare ``a`` and ``b`` (``{seed: value}``) on the seeds both have (sorted); ``ValueError``
    when they share none."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"{a_name} and {b_name} share no seed")
    d = [float(a[s]) - float(b[s]) for s in seeds]
    mean, low, high = mean_ci(d, level)
    return Comparison(a=a_name, b=b_name, seeds=seeds, differences=d, mean=mean, low=low, high=high,
                      level=level, sd=mean_std(d)[1], wins=sum(x > 0 for x in d),
                      losses=sum(x < 0 for x in d), t_p=t_test_p(d), sign_p=sign_test_p(d),
                      permutation_p=permutation_p(d) if len(d) <= MAX_EXACT_PERMUTATION else math.nan,
                      significant=bool(len(d) > 1 and (low > 0 or high < 0)))


def _p(v) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.3g}"


def comparisons_table(comparisons: list, unit: str) -> str:
    """Markdown table of :class:`Comparison` dicts (``to_dict``); ``unit`` names the values'
    unit in the header (e.g. ``"points"``)."""
    lines = [f"| difference ({unit}) | seeds | mean | 95% CI (Student t) | a > b | t-test p | "
             "sign test p | permutation p | significant |", "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        n = len(c["seeds"])
        ci = "n/a (1 seed)" if n < 2 else f"[{c['low']:+.4g}, {c['high']:+.4g}]"
        verdict = "n/a" if n < 2 else ("yes" if c["significant"] else "no")
        ps = [_p(c[k]) if n > 1 else "n/a" for k in ("t_p", "sign_p", "permutation_p")]
        lines.append(f"| {c['a']} - {c['b']} | {n} | {c['mean']:+.4g} | {ci} | {c['wins']}/{n} | "
                     f"{' | '.join(ps)} | {verdict} |")
    return "\n".join(lines)


def verdict(c: dict, unit: str) -> str:
    """One sentence on a :class:`Comparison` dict: the mean difference, its CI and whether the CI
    excludes 0, with the sign and permutation tests' p-values."""
    n = len(c["seeds"])
    head = f"{c['a']} - {c['b']}: {c['mean']:+.4g} {unit}"
    if n < 2:
        return f"{head} (one seed: no interval, not tested)."
    word = "significant" if c["significant"] else "not significant"
    level = round(100 * c["level"])
    return (f"{head}, {level}% CI [{c['low']:+.4g}, {c['high']:+.4g}] over {n} seeds ({c['wins']} of {n} "
            f"positive): {word} at the {100 - level}% level (paired t-test p = {_p(c['t_p'])}; sign "
            f"test p = {_p(c['sign_p'])}; permutation p = {_p(c['permutation_p'])}).")
