"""Resumable, rank-sharded samplers with O(1) state.

Every sampler here yields plain Python ``int``s (lists of ints for the batch sampler), has
``state_dict()`` / ``load_state_dict()`` (and the ``get_state`` / ``set_state`` aliases),
``__len__`` and a ``set_epoch`` that never resets a restored position of the same epoch. Wrap
them in :class:`lightning_utils.data.loader.ResumableDataLoader` to resume mid-epoch in Lightning.
"""

from lightning_utils.data.samplers.base import ResumableSampler
from lightning_utils.data.samplers.batched_ordered import BatchedOrderedSampler
from lightning_utils.data.samplers.ordered import OrderedSampler
from lightning_utils.data.samplers.permutation import KeyedPermutation
from lightning_utils.data.samplers.pool import PoolSampler
from lightning_utils.data.samplers.random import RandomSampler

__all__ = [
    "BatchedOrderedSampler",
    "KeyedPermutation",
    "OrderedSampler",
    "PoolSampler",
    "RandomSampler",
    "ResumableSampler",
]
