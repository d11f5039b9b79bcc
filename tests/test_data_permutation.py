"""The keyed permutation behind the global shuffle: a bijection of [0, n) for every n (checked exhaustively),
its inverse, O(1) start at n = 10^10, keys that matter, and a shuffle that looks random."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from sedd_scale.data.permutation import KeyedPermutation

SIZES = list(range(1, 130)) + [255, 256, 257, 1000, 1023, 1024, 1025, 4097, 65535, 65536, 65537, 100_003]


@pytest.mark.parametrize("key", [(0,), (7, 1, 3), (2**40, 5, 0)])
def test_a_bijection_for_every_size(key):
    for n in SIZES:
        perm = KeyedPermutation(n, key)
        image = perm(np.arange(n))
        assert image.dtype == np.int64 and np.array_equal(np.sort(image), np.arange(n)), n  # onto [0, n), once each
        assert np.array_equal(perm.inverse(image), np.arange(n)), n
        assert np.array_equal(perm(perm.inverse(np.arange(n))), np.arange(n)), n


def test_ten_billion_positions_start_instantly():
    started = time.perf_counter()
    perm = KeyedPermutation(10**10, (3, 0, 9))
    x = np.array([0, 1, 2, 10**10 - 2, 10**10 - 1, 1234567890123 % 10**10])
    y = perm(x)
    assert time.perf_counter() - started < 0.5  # nothing of size n is built
    assert ((0 <= y) & (y < 10**10)).all() and len(set(y.tolist())) == len(x)
    assert np.array_equal(perm.inverse(y), x)
    window = perm(np.arange(10**10 - 100_000, 10**10))  # any stretch of positions, vectorised
    assert len(np.unique(window)) == 100_000 and window.max() < 10**10


def test_keys_choose_different_permutations_and_it_is_reproducible():
    n = 5000
    a, b = KeyedPermutation(n, (0, 0, 0))(np.arange(n)), KeyedPermutation(n, (0, 0, 1))(np.arange(n))
    assert np.mean(a == b) < 0.01  # another epoch (or seed, or source) is another order
    assert np.array_equal(a, KeyedPermutation(n, (0, 0, 0))(np.arange(n)))  # the same key, the same order
    # recorded values: the order must never change under a numpy or Python upgrade (resumed runs depend on it)
    assert KeyedPermutation(10, (0,))(np.arange(10)).tolist() == [2, 3, 8, 1, 0, 5, 4, 9, 6, 7]
    assert KeyedPermutation(10**10, (1, 2, 3))(np.array([0, 1, 2])).tolist() == [3088118987, 5195954351, 8916902013]


def test_the_order_looks_random():
    n = 1 << 16
    y = KeyedPermutation(n, (11,))(np.arange(n)).astype(np.float64)
    x = np.arange(n, dtype=np.float64)
    assert abs(np.corrcoef(x, y)[0, 1]) < 4 / math.sqrt(n)  # no rank correlation beyond 4 standard errors
    assert abs(np.mean(np.abs(np.diff(y))) / n - 1 / 3) < 0.01  # E|U - V| = 1/3 for independent uniforms
    fixed = np.sum(y == x)
    assert fixed < 10  # a random permutation has one fixed point on average (Poisson(1))
    counts = np.bincount((y[: n // 2] * 16 // n).astype(int), minlength=16)  # the first half lands everywhere
    expected = n // 2 / 16
    assert ((counts - expected) ** 2 / expected).sum() < 40  # chi-square, 15 degrees of freedom (p ~ 5e-4)


def test_bad_input():
    with pytest.raises(ValueError, match="n >= 1"):
        KeyedPermutation(0, (0,))
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 5\)"):
        KeyedPermutation(5, (0,))(np.array([5]))
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 5\)"):
        KeyedPermutation(5, (0,)).inverse(np.array([-1]))
