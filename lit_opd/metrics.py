"""Evaluation metrics: the unbiased pass@k estimator and avg@n."""

import math
import operator


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 − C(n−c, k) / C(n, k).

    n samples of which c are correct. Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i), which never
    forms the binomials, so it stays exact in float64 for n in the thousands.
    """
    try:
        n, c, k = operator.index(n), operator.index(c), operator.index(k)
    except TypeError:
        raise ValueError(f"n, c, k must be integers, got n={n!r}, c={c!r}, k={k!r}") from None
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n ≥ 1 and 0 ≤ c ≤ n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 ≤ k ≤ n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    log_fail = sum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    return 1.0 - math.exp(log_fail)


def avg_at_n(n: int, c: int) -> float:
    """avg@n: the fraction c / n of correct samples (the expected pass@1)."""
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n ≥ 1 and 0 ≤ c ≤ n, got n={n}, c={c}")
    return c / n
