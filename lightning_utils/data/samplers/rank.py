"""Which shard a sampler serves: ``(num_replicas, rank)`` resolved when iteration starts.

In a Lightning DDP script the DataLoader (and its sampler) is often built before the process
group exists, so a sampler built with ``num_replicas=None`` / ``rank=None`` must not read
``torch.distributed`` at construction. :func:`resolve_replicas` is called at the start of every
pass instead. With tensor (or any model) parallelism the shard is the *data-parallel* rank of
the data-parallel size, not the global rank: the ranks of one tensor-parallel group must see the
same samples. Only the training framework knows that split (Lightning's
``trainer.distributed_sampler_kwargs``), so it comes in as ``default``
(``ResumableSampler.set_replicas``). This module must never initialise a process group or cache
a world size.
"""

from __future__ import annotations

import operator

import torch.distributed as dist

__all__ = ["check_replica_args", "resolve_replicas"]


def check_replica_args(num_replicas: int | None, rank: int | None) -> tuple[int | None, int | None]:
    """Validate explicit ``num_replicas`` / ``rank`` arguments (``None`` means: ask torch.distributed later)."""
    if num_replicas is not None:
        num_replicas = operator.index(num_replicas)
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if rank is not None:
        rank = operator.index(rank)
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
    if num_replicas is not None and rank is not None and rank >= num_replicas:
        raise ValueError(f"rank must be < num_replicas, got rank={rank}, num_replicas={num_replicas}")
    return num_replicas, rank


def resolve_replicas(
    num_replicas: int | None, rank: int | None, default: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Fill in missing ``num_replicas`` / ``rank`` from ``default`` (the data-parallel size and
    rank someone who knows them set), else from an initialised process group, else ``(1, 0)``."""
    if num_replicas is None or rank is None:
        if default is not None:
            world, me = default
        elif dist.is_available() and dist.is_initialized():
            world, me = dist.get_world_size(), dist.get_rank()
        else:
            world, me = 1, 0
        num_replicas = world if num_replicas is None else num_replicas
        rank = me if rank is None else rank
    if not 0 <= rank < num_replicas:
        raise ValueError(
            f"sampler rank {rank} is outside [0, num_replicas={num_replicas}); pass matching "
            "`num_replicas` and `rank`, or leave both as None to read them from torch.distributed"
        )
    return num_replicas, rank
