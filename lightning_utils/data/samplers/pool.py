"""``PoolSampler``: a "marble bag" that draws without replacement and refills when empty.

Each refill (a bag epoch) is one keyed permutation of the pool, so the draw sequence is endless
and fully described by ``(pool size, seed, draws so far)``. Draw ``t`` (counted over all ranks)
is ``perm_{t // n}[t % n]``; rank ``r`` of ``R`` takes draws ``r, r + R, ...``. This module must
never keep the list of remaining indices or use the global ``random`` module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch

from lightning_utils.data.samplers.base import ResumableSampler
from lightning_utils.data.samplers.permutation import KeyedPermutation

__all__ = ["PoolSampler"]


def default_seed() -> int:
    """Lightning's global seed (``seed_everything`` exports ``PL_GLOBAL_SEED``), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class PoolSampler(ResumableSampler):
    """Endless draws without replacement from ``pool``; the bag refills when empty.

    Args:
        pool: the values (or just something sized: only its length is used unless ``keep_all``).
        keep_all: yield ``pool[i]`` instead of the index ``i``.
        seed: selects the permutations; ``None`` uses Lightning's ``PL_GLOBAL_SEED`` if set, else 0.
        num_replicas, rank: the shard; ``None``: the data-parallel ones given to
            :meth:`~lightning_utils.data.samplers.ResumableSampler.set_replicas` (a
            ``ResumableDataLoader`` gives its trainer's), else ``torch.distributed``'s, read
            when iteration starts.

    ``len()`` is the pool size (divided among ranks): one Lightning epoch empties one bag.
    Iteration never ends on its own; ``set_epoch`` is accepted and ignored, because the bag's
    position is a running draw count that Lightning's epochs must not reset.
    """

    _STATE_NAME: ClassVar[str] = "PoolSampler"
    _REQUIRED_KEYS: ClassVar[frozenset[str]] = frozenset({"position", "length", "seed"})
    _ENDLESS: ClassVar[bool] = True
    _SHUFFLES: ClassVar[bool] = True

    def __init__(
        self,
        pool: Sequence[Any],
        keep_all: bool = False,
        seed: int | None = None,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        try:
            self.length = len(pool)
        except TypeError:
            raise TypeError(f"PoolSampler: pool must be a sized sequence, got {type(pool).__name__}") from None
        self.keep_all = bool(keep_all)
        self.pool = list(pool) if self.keep_all else None
        super().__init__(
            num_replicas=num_replicas, rank=rank, drop_last=False, seed=default_seed() if seed is None else seed
        )

    # -- the draw sequence ------------------------------------------------------------------------
    def _bag(self, bag_epoch: int) -> KeyedPermutation:
        return self._keyed_permutation(self.length, bag_epoch)

    def _epoch_size(self) -> int:
        return self.length

    def _identity(self) -> dict[str, Any]:
        return {"length": self.length, "seed": self._seed, "keep_all": self.keep_all}

    def _units(self, epoch: int, first: int, stride: int, count: int) -> list[Any]:
        n = self.length
        positions = torch.arange(count, dtype=torch.int64) * stride + first
        bags = torch.div(positions, n, rounding_mode="floor")
        offsets = positions - bags * n
        out = torch.empty_like(positions)
        for bag in torch.unique(bags).tolist():  # a block spans at most a few refills
            mask = bags == bag
            out[mask] = self._bag(bag).take(offsets[mask])
        indices = out.tolist()
        if self.pool is not None:
            return [self.pool[i] for i in indices]
        return indices

    def __iter__(self) -> Iterator[Any]:
        if self.length == 0:
            return iter(())  # an empty bag iterates nothing
        return super().__iter__()

    def set_epoch(self, epoch: int) -> None:
        """Accepted for Lightning's sake and ignored: the bag continues where it is."""

    @property
    def epoch(self) -> int:  # type: ignore[override]
        """Number of complete refills so far (all ranks together)."""
        return self._position // self.length if self.length else 0

    def index(self) -> int:
        """Draws taken from the current bag: 1, 2, ... and 0 again right after it empties."""
        return self._position % self.length if self.length else 0

    # -- single draws, outside iteration -------------------------------------------------------------
    def sample(self, pool: Sequence[Any] | None = None) -> Any:
        """Draw one item for this rank; ``pool`` maps the drawn index into another sequence."""
        if self.length == 0:
            raise IndexError("PoolSampler.sample: the pool is empty")
        num_replicas, rank = self._replicas()
        draw = self._position + rank
        index = self._bag(draw // self.length)[draw % self.length]
        self._position += num_replicas
        self._last_num_replicas = num_replicas
        self._token = object()  # a running iterator must not overwrite this draw
        source = pool if pool is not None else self.pool
        return source[index] if source is not None else index

    __call__ = sample

    def _make_state(
        self, epoch: int, position: int, num_replicas: int | None, epoch_arg: int | None = None
    ) -> dict[str, Any]:
        bag_epoch = position // self.length if self.length else 0  # derived, informational
        return super()._make_state(bag_epoch, position, num_replicas, None)

    def load_state_dict(self, state: Any) -> None:
        super().load_state_dict(state)
        self._epoch = self._position // self.length if self.length else 0
