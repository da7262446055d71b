"""pass@k (unbiased estimator) and avg@n: hand values, exact fractions up to n = 1024, properties."""

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_opd.metrics import avg_at_n, pass_at_k


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (5, 2, 2, 0.7),  # 1 − C(3,2)/C(5,2) = 1 − 3/10
        (4, 1, 2, 0.5),  # 1 − C(3,2)/C(4,2) = 1 − 3/6
        (10, 3, 1, 0.3),  # 1 − C(7,1)/C(10,1) = 1 − 7/10
        (8, 1, 8, 1.0),  # n − c = 7 < k = 8
        (8, 2, 4, 0.7857142857142857),  # 1 − C(6,4)/C(8,4) = 1 − 15/70 = 11/14
        (16, 0, 8, 0.0),  # no correct sample
        (16, 16, 1, 1.0),  # every sample correct
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15)


def test_pass_at_k_is_not_the_biased_estimator():
    # The biased 1 − (1 − c/n)^k would give 1 − 0.6² = 0.64 here, not 0.7.
    assert pass_at_k(5, 2, 2) != pytest.approx(0.64, abs=1e-3)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 200, 1024])
def test_pass_at_k_matches_exact_fractions(n):
    cs = sorted({0, 1, 2, n // 3, n // 2, n - 2, n - 1, n} & set(range(n + 1)))
    ks = sorted({1, 2, 5, 8, 16, n // 4, n // 2, n} & set(range(1, n + 1)))
    for c in cs:
        for k in ks:
            exact = exact_pass_at_k(n, c, k)
            # Relative tolerance: small pass@k values must be resolved, not lost to 1 − x cancellation;
            # then the failure probability 1 − pass@k, for values close to 1.
            assert math.isclose(pass_at_k(n, c, k), float(exact), rel_tol=1e-12, abs_tol=1e-300), (n, c, k)
            assert math.isclose(1 - pass_at_k(n, c, k), float(1 - exact), rel_tol=1e-9, abs_tol=1e-15), (n, c, k)


def test_pass_at_k_tiny_values_for_large_n():
    # n = 1024, c = 1, k = 1: exactly 1/1024; c = 1, k = 2: 2/1024 (binomials of size ~5e5 cancel).
    assert pass_at_k(1024, 1, 1) == pytest.approx(1 / 1024, rel=1e-14)
    assert pass_at_k(1024, 1, 2) == pytest.approx(2 / 1024, rel=1e-14)
    # C(1024, 512) overflows a float64; the estimator must not form it.
    assert pass_at_k(1024, 3, 512) == pytest.approx(float(exact_pass_at_k(1024, 3, 512)), rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 1024).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_properties(nck):
    n, c, k = nck
    p = pass_at_k(n, c, k)
    assert 0.0 <= p <= 1.0
    assert math.isclose(p, float(exact_pass_at_k(n, c, k)), rel_tol=1e-11, abs_tol=1e-15)
    if c < n:
        assert pass_at_k(n, c + 1, k) >= p  # monotone in c
    if k < n:
        assert pass_at_k(n, c, k + 1) >= p  # monotone in k
    assert pass_at_k(n, c, 1) == pytest.approx(c / n, rel=1e-12, abs=1e-15)  # pass@1 = c/n
    if c == 0:
        assert p == 0.0
    if n - c < k:
        assert p == 1.0


def test_avg_at_n():
    assert avg_at_n(8, 3) == 0.375
    assert avg_at_n(8, 3) == pytest.approx(pass_at_k(8, 3, 1), abs=1e-15)


@pytest.mark.parametrize(
    "n,c,k",
    [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5), (4, 2, -1), (4.5, 2, 1), (4, 2.0, 1), ("8", 2, 1)],
)
def test_pass_at_k_bad_input_raises_value_error(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


@pytest.mark.parametrize("n,c", [(0, 0), (4, 5), (4, -1)])
def test_avg_at_n_bad_input_raises_value_error(n, c):
    with pytest.raises(ValueError):
        avg_at_n(n, c)
