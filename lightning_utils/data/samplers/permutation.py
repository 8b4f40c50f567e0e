"""Keyed pseudo-random permutations of ``[0, n)`` with O(1) state and O(1) memory.

A :class:`KeyedPermutation` maps a position ``i`` to ``perm[i]`` on demand, so a sampler over
10**8 items never materialises a ``randperm``: its whole shuffle is described by ``(n, seed,
epoch)``. The map is a balanced Feistel network over the smallest even-bit domain that holds
``n`` (at most 4n values), made a bijection on ``[0, n)`` by cycle-walking: values that land
outside ``[0, n)`` are pushed through the network again until they land inside.

The round function is an integer hash whose intermediate products stay below 2**62, so the
pure-Python path (:meth:`KeyedPermutation.__getitem__`) and the vectorised torch path
(:meth:`KeyedPermutation.take`) compute bit-identical results.

This module must never hold an O(n) table and never touch global RNG state (``random``,
``torch.manual_seed``): the permutation depends on its key alone.
"""

from __future__ import annotations

import operator

import torch

__all__ = ["KeyedPermutation"]

_MASK64 = (1 << 64) - 1
_MASK31 = (1 << 31) - 1
# Odd multipliers below 2**31, so (31-bit value) * multiplier < 2**62 fits an int64 exactly.
_MUL1 = 0x5BD1E995
_MUL2 = 0x27D4EB2F
_ROUNDS = 6
#: Largest supported n: the two Feistel halves must each fit in 31 bits.
MAX_LENGTH = 1 << 62


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a well-mixed 64-bit value from any integer (Python ints)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class KeyedPermutation:
    """A bijection of ``[0, n)`` chosen by ``(seed, epoch)``, evaluated index by index.

    Args:
        n: size of the domain, ``0 <= n < 2**62``.
        seed: any integer; together with ``epoch`` it selects the permutation.
        epoch: any non-negative integer; each epoch gives an independent-looking permutation.

    ``perm[i]`` costs a few microseconds in Python; :meth:`take` evaluates many positions at
    once with torch integer ops (well under a microsecond per position).
    """

    __slots__ = ("_half", "_hmask", "_keys", "epoch", "n", "seed")

    def __init__(self, n: int, seed: int, epoch: int = 0) -> None:
        n = operator.index(n)
        if not 0 <= n < MAX_LENGTH:
            raise ValueError(f"KeyedPermutation: n must be in [0, 2**62), got {n}")
        self.n = n
        self.seed = operator.index(seed)
        self.epoch = operator.index(epoch)
        bits = max(2, (n - 1).bit_length()) if n > 1 else 2
        self._half = (bits + 1) // 2
        self._hmask = (1 << self._half) - 1
        base = _mix64(_mix64(self.seed & _MASK64) ^ (self.epoch & _MASK64))
        self._keys = tuple(_mix64(base + r) & _MASK31 for r in range(_ROUNDS))

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"KeyedPermutation(n={self.n}, seed={self.seed}, epoch={self.epoch})"

    # -- scalar path -------------------------------------------------------------------------
    def _feistel(self, x: int) -> int:
        half, hmask = self._half, self._hmask
        left, right = x >> half, x & hmask
        for k in self._keys:
            v = ((right ^ k) * _MUL1) & _MASK31
            v ^= v >> 16
            v = (v * _MUL2) & _MASK31
            v ^= v >> 15
            left, right = right, left ^ (v & hmask)
        return (left << half) | right

    def __getitem__(self, i: int) -> int:
        i = operator.index(i)
        n = self.n
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"position {i} out of range for a permutation of {n}")
        if n <= 1:
            return i
        y = self._feistel(i)
        while y >= n:  # cycle-walk back into [0, n)
            y = self._feistel(y)
        return y

    # -- vectorised path ---------------------------------------------------------------------
    def _feistel_t(self, x: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as _feistel, in place on a few buffers (allocation dominates otherwise).
        half, hmask = self._half, self._hmask
        left, right = x >> half, x & hmask
        v = torch.empty_like(x)
        w = torch.empty_like(x)
        for k in self._keys:
            torch.bitwise_xor(right, k, out=v)
            v.mul_(_MUL1).bitwise_and_(_MASK31)
            torch.bitwise_right_shift(v, 16, out=w)
            v.bitwise_xor_(w)
            v.mul_(_MUL2).bitwise_and_(_MASK31)
            torch.bitwise_right_shift(v, 15, out=w)
            v.bitwise_xor_(w).bitwise_and_(hmask)
            left.bitwise_xor_(v)
            left, right = right, left
        return left.bitwise_left_shift_(half).bitwise_or_(right)

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        """``perm[p]`` for every ``p`` in an int64 tensor of positions in ``[0, n)``."""
        if positions.dtype != torch.int64:
            positions = positions.to(torch.int64)
        if self.n <= 1 or positions.numel() == 0:
            return positions.clone()
        y = self._feistel_t(positions)
        out = y >= self.n
        while bool(out.any()):
            idx = out.nonzero().squeeze(1)
            y[idx] = self._feistel_t(y[idx])
            out[idx] = y[idx] >= self.n
        return y
