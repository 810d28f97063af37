"""Intervals: bootstrap over evaluation sequences, Wilson for accuracies, t over seeds."""

from __future__ import annotations

import math

import numpy as np

from lengen.api import Value


PPL_BOUNDS = (1.0, None)  # a perplexity is never below 1


def percentile_interval(samples, confidence: float = 0.95) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(np.asarray(samples, dtype=np.float64), [alpha, 1 - alpha])
    return float(lo), float(hi)


def _bootstrap_means(per_seq_sums, counts, samples: int, seed: int):
    """``(point, resampled means or None, n)`` of ``sum / count`` over sequences."""
    s = np.asarray(per_seq_sums, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    keep = c > 0
    s, c = s[keep], c[keep]
    n = len(s)
    if n == 0:
        return float("nan"), None, 0
    point = float(s.sum() / c.sum())
    if n == 1 or samples <= 0:
        return point, None, n
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    return point, s[idx].sum(axis=1) / c[idx].sum(axis=1), n


def bootstrap_mean(per_seq_sums, counts, *, samples: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> Value:
    """Token-weighted mean ``sum / count`` with a percentile bootstrap that resamples whole
    sequences (tokens of one sequence are not independent)."""
    point, boot, n = _bootstrap_means(per_seq_sums, counts, samples, seed)
    if boot is None:
        return Value(point, None, None, None, n)
    lo, hi = percentile_interval(boot, confidence)
    return Value(point, lo, hi, float(boot.std(ddof=1)), n)


def bootstrap_ppl(nll_sums, counts, *, samples: int = 1000, confidence: float = 0.95,
                  seed: int = 0) -> Value:
    """Perplexity ``exp(sum nll / sum count)`` with the sequence-level bootstrap interval.

    ``nll_sums[i]`` and ``counts[i]`` are sequence ``i``'s summed NLL and token count.
    """
    point, boot, n = _bootstrap_means(nll_sums, counts, samples, seed)
    if boot is None:
        return Value(float(np.exp(point)), None, None, None, n, bounds=PPL_BOUNDS)
    lo, hi = percentile_interval(boot, confidence)
    return Value(float(np.exp(point)), float(np.exp(lo)), float(np.exp(hi)), float(np.exp(boot).std(ddof=1)), n,
                 bounds=PPL_BOUNDS)


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: int, n: int, *, confidence: float = 0.95) -> Value:
    """Accuracy ``successes / n`` with the Wilson score interval."""
    if n == 0:
        return Value(float("nan"), None, None, None, 0)
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return Value(p, lo, hi, math.sqrt(p * (1 - p) / n), n, bounds=(0.0, 1.0))


def across_seeds(values: list[float], *, confidence: float = 0.95,
                 bounds: tuple[float | None, float | None] = (None, None)) -> Value:
    """Mean over training seeds with a Student-t interval (n >= 2), clipped to ``bounds``, the
    range the quantity can take (a recall interval never leaves [0, 1]; with two seeds the
    t quantile is 12.7 and the raw interval easily would)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    n = len(v)
    if n == 0:
        return Value(float("nan"), None, None, None, 0)
    mean = float(v.mean())
    if n == 1:
        return Value(mean, None, None, None, 1)
    se = float(v.std(ddof=1) / math.sqrt(n))
    t = _t_quantile(0.5 + confidence / 2, n - 1)
    lo, hi = mean - t * se, mean + t * se
    if bounds[0] is not None:
        lo = max(lo, bounds[0])
    if bounds[1] is not None:
        hi = min(hi, bounds[1])
    return Value(mean, lo, hi, se, n)


def _t_quantile(q: float, df: int) -> float:
    """Student-t quantile by bisection on the regularized incomplete beta (no scipy)."""
    def cdf(t: float) -> float:
        x = df / (df + t * t)
        tail = 0.5 * _betainc(df / 2, 0.5, x)
        return 1 - tail if t > 0 else tail

    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if cdf(mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by continued fraction (Numerical Recipes form)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(math.log(x) * a + math.log(1 - x) * b + lbeta)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = (m * (b - m) * x) / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1.0 + num / (c if abs(c) > 1e-300 else 1e-300)
        f *= c * d
        if abs(1.0 - c * d) < 1e-12:
            break
    return front * (f - 1.0) / a


def bootstrap_ppl_ratio(sums_a, counts_a, sums_b, counts_b, *, samples: int = 1000,
                        confidence: float = 0.95, seed: int = 0) -> Value:
    """``ppl_a / ppl_b`` measured on the same sequences, resampled together (paired)."""
    sa, ca, sb, cb = (np.asarray(x, dtype=np.float64) for x in (sums_a, counts_a, sums_b, counts_b))
    keep = (ca > 0) & (cb > 0)
    sa, ca, sb, cb = sa[keep], ca[keep], sb[keep], cb[keep]
    n = len(sa)
    if n == 0:
        return Value(float("nan"), None, None, None, 0)
    point = float(np.exp(sa.sum() / ca.sum() - sb.sum() / cb.sum()))
    if n == 1 or samples <= 0:
        return Value(point, None, None, None, n, bounds=(0.0, None))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(samples, n))
    log_ratio = sa[idx].sum(1) / ca[idx].sum(1) - sb[idx].sum(1) / cb[idx].sum(1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(log_ratio, [alpha, 1 - alpha])
    return Value(point, float(np.exp(lo)), float(np.exp(hi)), float(np.exp(log_ratio).std(ddof=1)), n,
                 bounds=(0.0, None))
