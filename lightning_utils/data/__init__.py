"""Resumable data: samplers with O(1) state and the ``DataLoader`` that Lightning resumes exactly.

What it is for: ``samplers`` (torch only) decide the order of an epoch and can be put back at any
position; ``loader.ResumableDataLoader`` counts what the training loop consumed and hands that
position to Lightning's checkpoint. The two meet only through the contract in
:mod:`lightning_utils.data.samplers.base` (``ResumableSampler``'s resume operations).

What it must never do: fetch data to fast-forward, or import ``lightning`` (the loader recognises
Lightning's loops through :mod:`lightning_utils._internals`, which reads only modules that are
already imported).
"""

from lightning_utils.data.loader import ResumableDataLoader
from lightning_utils.data.samplers import (
    BatchedOrderedSampler,
    KeyedPermutation,
    OrderedSampler,
    PoolSampler,
    RandomSampler,
    ResumableSampler,
)

__all__ = [
    "BatchedOrderedSampler",
    "KeyedPermutation",
    "OrderedSampler",
    "PoolSampler",
    "RandomSampler",
    "ResumableDataLoader",
    "ResumableSampler",
]
