"""Resumable, rank-sharded samplers with O(1) state.

Every sampler here yields plain Python ``int``s (lists of ints for the batch sampler), has
``state_dict()`` / ``load_state_dict()`` (and the ``get_state`` / ``set_state`` aliases),
``__len__`` and a ``set_epoch`` that never resets a restored position of the same epoch. Wrap
them in :class:`lightning_utils.data.loader.ResumableDataLoader` to resume mid-epoch in Lightning;
the loader uses the resume contract of :class:`ResumableSampler` (``plan_pass``, ``state_after``,
``bookmark``, ``seek``, ``state_at``; see :mod:`lightning_utils.data.samplers.base`).

This package must never import ``lightning``: it is torch only.
"""

from lightning_utils.data.samplers.base import Bookmark, Pass, ResumableSampler
from lightning_utils.data.samplers.batched_ordered import BatchedOrderedSampler
from lightning_utils.data.samplers.ordered import OrderedSampler
from lightning_utils.data.samplers.permutation import KeyedPermutation
from lightning_utils.data.samplers.pool import PoolSampler
from lightning_utils.data.samplers.random import RandomSampler

__all__ = [
    "BatchedOrderedSampler",
    "Bookmark",
    "KeyedPermutation",
    "OrderedSampler",
    "Pass",
    "PoolSampler",
    "RandomSampler",
    "ResumableSampler",
]
