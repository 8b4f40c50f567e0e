"""``OrderedSampler``: ``0 .. length-1`` in order, every epoch, sharded across ranks.

State is ``{"position", "length", ...}``; the position counts indices already *yielded*, so a
restored sampler never repeats the last delivered index. This module must
never keep an index list.
"""

from __future__ import annotations

import operator
from collections.abc import Sized
from typing import Any, ClassVar

from lightning_utils.data.samplers.base import ResumableSampler

__all__ = ["OrderedSampler"]


def _length_of(length: int | Sized, owner: str) -> int:
    if isinstance(length, Sized) and not isinstance(length, (str, bytes)):
        length = len(length)
    try:
        length = operator.index(length)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{owner}: length must be an int or a sized dataset, got {type(length).__name__}") from None
    if length < 0:
        raise ValueError(f"{owner}: length must be >= 0, got {length}")
    return length


class OrderedSampler(ResumableSampler):
    """Yields ``0, 1, ..., length-1`` (this rank's share of it) every epoch.

    Args:
        length: number of items, or a sized dataset.
        num_replicas, rank: the shard; ``None``: the data-parallel ones given to
            :meth:`~lightning_utils.data.samplers.ResumableSampler.set_replicas` (a
            ``ResumableDataLoader`` gives its trainer's), else ``torch.distributed``'s, read
            when iteration starts.
        drop_last: with several ranks, drop the tail that does not divide evenly instead of
            padding it with indices from the start (``DistributedSampler`` semantics).
    """

    _STATE_NAME: ClassVar[str] = "OrderedSampler"
    _REQUIRED_KEYS: ClassVar[frozenset[str]] = frozenset({"position", "length"})

    def __init__(
        self,
        length: int | Sized,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.length = _length_of(length, "OrderedSampler")
        super().__init__(num_replicas=num_replicas, rank=rank, drop_last=drop_last, seed=0)

    def _epoch_size(self) -> int:
        return self.length

    def _identity(self) -> dict[str, Any]:
        return {"length": self.length, "drop_last": self._drop_last}

    def _units(self, epoch: int, first: int, stride: int, count: int) -> list[int]:
        n = self.length
        last = first + stride * (count - 1)
        if last < n:
            return list(range(first, last + 1, stride))
        return [p % n for p in range(first, last + 1, stride)]  # padding wraps to the start
