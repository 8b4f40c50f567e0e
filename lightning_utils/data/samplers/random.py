"""``RandomSampler``: a fresh, reproducible permutation of ``[0, length)`` every epoch.

The permutation of epoch ``e`` is a :class:`~lightning_utils.data.samplers.permutation.KeyedPermutation`
keyed by ``(seed, e)``, evaluated in small blocks as iteration proceeds, so ``RandomSampler(10**8)``
saves, restores and yields its next index in well under a millisecond with a state of a few
integers. This module must never call ``torch.randperm`` or touch global RNG state.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, ClassVar

import torch

from lightning_utils.data.samplers.base import ResumableSampler
from lightning_utils.data.samplers.ordered import _length_of
from lightning_utils.data.samplers.permutation import MAX_LENGTH, KeyedPermutation

__all__ = ["RandomSampler"]


class RandomSampler(ResumableSampler):
    """Yields a permutation of ``0 .. length-1`` (this rank's share of it), new each epoch.

    Args:
        length: number of items, or a sized dataset.
        seed: selects the permutations; the same seed gives the same order in every run.
        num_replicas, rank: the shard; ``None``: the data-parallel ones given to
            :meth:`~lightning_utils.data.samplers.ResumableSampler.set_replicas` (a
            ``ResumableDataLoader`` gives its trainer's), else ``torch.distributed``'s, read
            when iteration starts.
        drop_last: with several ranks, drop the uneven tail instead of padding it with indices
            from the start of the epoch's permutation (``DistributedSampler`` semantics).
    """

    _STATE_NAME: ClassVar[str] = "RandomSampler"
    _REQUIRED_KEYS: ClassVar[frozenset[str]] = frozenset({"position", "length", "seed", "epoch"})
    _SHUFFLES: ClassVar[bool] = True

    def __init__(
        self,
        length: int | Sized,
        seed: int = 0,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.length = _length_of(length, "RandomSampler")
        if self.length >= MAX_LENGTH:
            raise ValueError(f"RandomSampler: length must be < 2**62, got {self.length}")
        super().__init__(num_replicas=num_replicas, rank=rank, drop_last=drop_last, seed=seed)

    def permutation(self, epoch: int) -> KeyedPermutation:
        """The permutation epoch ``epoch`` uses (``perm[i]`` is the i-th global index)."""
        return self._keyed_permutation(self.length, epoch)

    def _epoch_size(self) -> int:
        return self.length

    def _identity(self) -> dict[str, Any]:
        return {"length": self.length, "seed": self._seed, "drop_last": self._drop_last}

    def _units(self, epoch: int, first: int, stride: int, count: int) -> list[int]:
        positions = torch.arange(count, dtype=torch.int64) * stride + first
        positions = torch.remainder(positions, self.length)  # padding wraps to the start
        return self.permutation(epoch).take(positions).tolist()
