"""``BatchedOrderedSampler``: duration buckets grouped into batches capped by cost and size.

A batch sampler (it yields lists of indices) for variable-length data such as audio or codec
token sequences. Batches are built once, at construction, from ``buckets`` of ``(item, duration)``
pairs; indices count items across all buckets in order. Each epoch visits every batch once,
in construction order or (``shuffle=True``) in a keyed permutation of the batches.

The duration cap is enforced: a batch's cost never exceeds ``max_duration`` unless a single
item alone does (that item gets a batch of its own). The
state is a few integers plus a fingerprint of the batch layout, never the batch list. This
module must never use the global ``random`` module.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

import torch

from lightning_utils.data.samplers.base import ResumableSampler
from lightning_utils.data.samplers.permutation import KeyedPermutation
from lightning_utils.data.samplers.pool import default_seed

__all__ = ["BatchedOrderedSampler"]


def _limit(value: float | None, name: str) -> float | None:
    """``None`` or a negative value disables a limit; 0 is an error (it would allow nothing)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"BatchedOrderedSampler: {name} must be a number or None, got {value!r}")
    if value == 0:
        raise ValueError(
            f"BatchedOrderedSampler: {name}=0 allows no batch at all; use None (or a negative value) for no limit"
        )
    return None if value < 0 else value


def build_batches(
    buckets: Mapping[Any, Iterable[Any]] | Iterable[Iterable[Any]],
    max_duration: float | None,
    max_batch_size: int | None,
    drop_last: bool,
    cost: Literal["padded", "sum"] = "padded",
) -> list[list[int]]:
    """Group ``(item, duration)`` pairs into batches; see :class:`BatchedOrderedSampler`."""
    groups = buckets.values() if isinstance(buckets, Mapping) else buckets
    keys = list(buckets.keys()) if isinstance(buckets, Mapping) else None
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = total = 0.0
    index = 0
    for g, group in enumerate(groups):
        for j, entry in enumerate(group):
            try:
                _, duration = entry
                duration = float(duration)
            except (TypeError, ValueError):
                where = f"bucket {keys[g]!r}" if keys is not None else f"bucket #{g}"
                raise ValueError(
                    f"BatchedOrderedSampler: {where}, entry {j} must be an (item, duration) pair with a "
                    f"numeric duration, got {entry!r}"
                ) from None
            if not duration >= 0 or math.isinf(duration):
                where = f"bucket {keys[g]!r}" if keys is not None else f"bucket #{g}"
                raise ValueError(
                    f"BatchedOrderedSampler: {where}, entry {j} has duration {duration}; need a finite value >= 0"
                )
            if batch:
                size = len(batch) + 1
                new_cost = max(longest, duration) * size if cost == "padded" else total + duration
                if (max_duration is not None and new_cost > max_duration) or (
                    max_batch_size is not None and size > max_batch_size
                ):
                    batches.append(batch)
                    batch, longest, total = [], 0.0, 0.0
            batch.append(index)
            longest = max(longest, duration)
            total += duration
            index += 1
    if batch:
        # The trailing batch is partial unless a cap closed it exactly; drop_last drops partial ones.
        final_cost = longest * len(batch) if cost == "padded" else total
        full = (max_batch_size is not None and len(batch) == max_batch_size) or (
            max_duration is not None and final_cost >= max_duration
        )
        if full or not drop_last:
            batches.append(batch)
    return batches


def _fingerprint(batches: list[list[int]]) -> int:
    crc = 0
    for batch in batches:
        crc = zlib.crc32(len(batch).to_bytes(4, "little"), crc)
        crc = zlib.crc32(torch.tensor(batch, dtype=torch.int64).numpy().tobytes(), crc)
    return crc


class BatchedOrderedSampler(ResumableSampler):
    """Batches of indices from duration buckets, capped by cost and by size.

    Args:
        buckets: ``{key: [(item, duration), ...]}`` (visited in dict order) or a list of such
            lists. The items are ignored; index ``i`` is the i-th pair over all buckets.
        max_duration: cap on a batch's cost; ``None`` or negative disables it, ``0`` is an error.
        max_batch_size: cap on a batch's size; ``None`` or negative disables it, ``0`` is an error.
        shuffle: visit the batches in a new keyed permutation each epoch.
        drop_last: drop the trailing batch unless a cap filled it (its size is max_batch_size or
            its cost reaches max_duration); with several ranks also drop the batches
            that do not divide evenly among them (otherwise they are padded by repeating the
            epoch's first batches).
        seed: selects the shuffles; ``None`` uses Lightning's ``PL_GLOBAL_SEED`` if set, else 0.
        cost: ``"padded"`` (default) = longest duration in the batch x batch size, the cost of a
            padded batch; ``"sum"`` = total duration, the cost of a packed batch.
        num_replicas, rank: the shard; ``None``: the data-parallel ones given to
            :meth:`~lightning_utils.data.samplers.ResumableSampler.set_replicas` (a
            ``ResumableDataLoader`` gives its trainer's), else ``torch.distributed``'s, read
            when iteration starts.
    """

    _STATE_NAME: ClassVar[str] = "BatchedOrderedSampler"
    _REQUIRED_KEYS: ClassVar[frozenset[str]] = frozenset({"position", "epoch", "num_batches", "fingerprint"})

    def __init__(
        self,
        buckets: Mapping[Any, Iterable[Any]] | Iterable[Iterable[Any]],
        max_duration: float | None = None,
        max_batch_size: int | None = None,
        shuffle: bool = False,
        drop_last: bool = True,
        seed: int | None = None,
        *,
        cost: Literal["padded", "sum"] = "padded",
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if cost not in ("padded", "sum"):
            raise ValueError(f"BatchedOrderedSampler: cost must be 'padded' or 'sum', got {cost!r}")
        self.max_duration = _limit(max_duration, "max_duration")
        size_cap = _limit(max_batch_size, "max_batch_size")
        if size_cap is not None and size_cap != int(size_cap):
            raise ValueError(f"BatchedOrderedSampler: max_batch_size must be an integer, got {max_batch_size!r}")
        self.max_batch_size = None if size_cap is None else int(size_cap)
        if self.max_duration is None and self.max_batch_size is None:
            raise ValueError("BatchedOrderedSampler: set max_duration or max_batch_size (both are disabled)")
        self.cost = cost
        self.batches = build_batches(buckets, self.max_duration, self.max_batch_size, drop_last, cost)
        self.num_items = sum(len(b) for b in self.batches)
        self._fingerprint = _fingerprint(self.batches)
        self._shuffle = bool(shuffle)
        super().__init__(
            num_replicas=num_replicas, rank=rank, drop_last=drop_last, seed=default_seed() if seed is None else seed
        )

    @property
    def shuffle(self) -> bool:  # type: ignore[override]
        return self._shuffle

    def order(self, epoch: int) -> KeyedPermutation | None:
        """The batch permutation of ``epoch`` (``None`` when not shuffling)."""
        if not self._shuffle:
            return None
        return self._keyed_permutation(len(self.batches), epoch)

    def _epoch_size(self) -> int:
        return len(self.batches)

    def _identity(self) -> dict[str, Any]:
        identity: dict[str, Any] = {
            "num_batches": len(self.batches),
            "num_items": self.num_items,
            "fingerprint": self._fingerprint,
            "shuffle": self._shuffle,
            "drop_last": self._drop_last,
        }
        if self._shuffle:
            identity["seed"] = self._seed
        return identity

    def _units(self, epoch: int, first: int, stride: int, count: int) -> list[list[int]]:
        n = len(self.batches)
        positions = [p % n for p in range(first, first + stride * count, stride)]
        perm = self.order(epoch)
        if perm is not None:
            positions = perm.take(torch.tensor(positions, dtype=torch.int64)).tolist()
        return [list(self.batches[p]) for p in positions]
