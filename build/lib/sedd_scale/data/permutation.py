"""A keyed pseudo-random permutation of [0, n), evaluated per position in O(1) memory and time.

A Feistel network is a bijection on 2h-bit integers whatever its round function: split x into two
h-bit halves (L, R) and apply, four times, (L, R) -> (R, L xor F_i(R)). Here 4^h is the smallest
even power of two >= n, and cycle-walking (apply the network again while the value is >= n)
restricts it to a bijection of [0, n): the walk from x < n stops at the first value < n, and the
inverse walks back the same chain. Since 4^h < 4n, a walk takes under 4 steps on average.

So a 10^10-element permutation costs four 64-bit round keys, and any position is a few dozen
integer operations: no O(n) array, nothing to build at start. The round keys come from blake2b of
the key tuple, and the round function is splitmix64's finaliser in numpy uint64 arithmetic (which
wraps), so the permutation is the same on every machine, Python and numpy version.
"""
from __future__ import annotations

import hashlib

import numpy as np

_ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-avalanched 64-bit mixer (arrays wrap silently)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class KeyedPermutation:
    """A bijection of [0, n) chosen by `key` (e.g. (seed, source, epoch)); vectorised over positions."""

    def __init__(self, n: int, key: tuple[int, ...]):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = int(n)
        self.half = max(1, -(-(self.n - 1).bit_length() // 2))  # h: 4^h >= n
        self._mask = np.uint64((1 << self.half) - 1)
        self._shift = np.uint64(64 - self.half)  # a round keeps the top h bits of the mix: the best mixed
        digest = hashlib.blake2b(repr(tuple(int(k) for k in key)).encode(), digest_size=8 * _ROUNDS).digest()
        self._keys = [np.uint64(int.from_bytes(digest[8 * i:8 * i + 8], "little")) for i in range(_ROUNDS)]

    def _round(self, half: np.ndarray, i: int) -> np.ndarray:
        return _mix(half + self._keys[i]) >> self._shift

    def _forward(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self._mask
        for i in range(_ROUNDS):
            left, right = right, left ^ self._round(right, i)
        return (left << h) | right

    def _backward(self, y: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = y >> h, y & self._mask
        for i in reversed(range(_ROUNDS)):
            left, right = right ^ self._round(left, i), left
        return (left << h) | right

    def _walk(self, x: np.ndarray, step) -> np.ndarray:
        x = np.asarray(x, dtype=np.int64)
        shape, x = x.shape, x.reshape(-1)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise ValueError(f"positions must lie in [0, {self.n})")
        y = step(x.astype(np.uint64))
        outside = np.flatnonzero(y >= np.uint64(self.n))
        while outside.size:  # cycle-walking: on average under 4 rounds in all
            y[outside] = step(y[outside])
            outside = outside[y[outside] >= np.uint64(self.n)]
        return y.astype(np.int64).reshape(shape)

    def __call__(self, x) -> np.ndarray:
        """pi(x) for every position in x (int64 array of the same shape)."""
        return self._walk(x, self._forward)

    def inverse(self, y) -> np.ndarray:
        """pi^-1(y) for every value in y."""
        return self._walk(y, self._backward)
