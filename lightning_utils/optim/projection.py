"""Device-independent projection matrices for APOLLO.

What it is for: building the random (or SVD) projection an :class:`~lightning_utils.optim.Apollo`
parameter uses, from nothing but integers (a per-parameter seed and a refresh index), so the
same matrix comes back in a fresh process, under any global RNG state, on CPU or on CUDA.

What it must never do: touch the global RNG (``torch.manual_seed``/``torch.randn`` without a
generator), draw on a device-specific generator (CPU and CUDA streams differ for the same seed),
or keep state of its own. Callers cache matrices; this module only computes them.

The scheme:

- refresh ``k`` of a parameter with seed ``s`` uses the generator seed ``projection_seed(s, k)``:
  ``s`` itself for ``k == 0`` (so parameter #k's first matrix is ``randn(..., seed=k)``), else a
  SplitMix64 hash of ``(s, k)``. No chain of seeds has to be replayed after a resume.
- the matrix is drawn as float32 N(0, 1) on a dedicated **CPU** ``torch.Generator``, divided by
  ``sqrt(rank)``, then moved to the gradient's device and dtype. The values are therefore
  bit-identical on every device; only the arithmetic that uses them may differ between devices.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Side = Literal["left", "right"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(x: int) -> int:
    # SplitMix64 finaliser (Steele, Lea, Flood 2014): a bijective 64-bit mix with good avalanche.
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def projection_seed(seed: int, refresh: int) -> int:
    """The generator seed for refresh number ``refresh`` (0, 1, 2, ...) of a parameter's matrix.

    Refresh 0 uses ``seed`` itself; later refreshes use a 63-bit hash of ``(seed, refresh)``.
    """
    if refresh < 0:
        raise ValueError(f"refresh must be >= 0, got {refresh}")
    if refresh == 0:
        return int(seed)
    mixed = _splitmix64((_splitmix64(int(seed) & _MASK64) ^ (refresh * _GOLDEN)) & _MASK64)
    return mixed & ((1 << 63) - 1)


def projected_shape(shape: tuple[int, int], side: Side, rank: int) -> tuple[int, int]:
    """Shape of the projected gradient: ``(m, r)`` for a right projection, ``(r, n)`` for left."""
    m, n = shape
    return (m, rank) if side == "right" else (rank, n)


def random_projection(
    shape: tuple[int, int],
    side: Side,
    rank: int,
    seed: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The random matrix ``P`` for a gradient of 2-D ``shape`` ``(m, n)``.

    ``side="right"``: ``P`` has shape ``(rank, n)`` and the projected gradient is ``G @ P.T``.
    ``side="left"``: ``P`` has shape ``(m, rank)`` and the projected gradient is ``P.T @ G``.
    Entries are N(0, 1/rank), drawn in float32 on a CPU generator seeded with ``seed``.
    """
    m, n = shape
    size = (rank, n) if side == "right" else (m, rank)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    matrix = torch.randn(size, generator=generator, dtype=torch.float32, device="cpu")
    matrix.div_(math.sqrt(rank))
    return matrix.to(device=device, dtype=dtype)


def svd_projection(grad: torch.Tensor, side: Side, rank: int) -> torch.Tensor:
    """The GaLore-style projection: the top ``rank`` singular vectors of the 2-D ``grad``.

    Same shape convention as :func:`random_projection`. Computed in float32 and cast back to the
    gradient's dtype. Depends on the gradient, so callers must keep it in optimizer state.
    """
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    matrix = vh[:rank] if side == "right" else u[:, :rank]
    # A copy, whatever layout LAPACK returned: a slice would keep the whole factor alive (and be
    # saved whole with the optimizer state).
    return matrix.to(dtype=grad.dtype).clone(memory_format=torch.contiguous_format)
