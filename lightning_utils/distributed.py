"""Thin distributed helpers: who am I, am I the leader, and send rank 0's object to every rank.

These wrap ``torch.distributed`` and Lightning's strategies so that code can ask for its rank
and world size both *before* the process group exists (from the launcher's environment, the
same variables Lightning reads) and *after* (from ``torch.distributed``), and so that callbacks
can share one decision across ranks through ``trainer.strategy.broadcast``.

This module must never create, configure or destroy a process group, pick ports, or move
models: Lightning's strategies own all of that. Everything here is a read or a broadcast.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

import torch.distributed as dist

if TYPE_CHECKING:  # pragma: no cover
    from lightning.pytorch import Trainer

__all__ = [
    "all_gather_object",
    "broadcast_object",
    "distributed_is_initialized",
    "global_leader_only",
    "global_rank",
    "is_global_leader",
    "is_local_leader",
    "local_leader_only",
    "local_rank",
    "world_size",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

# The variables launchers set, in the order Lightning trusts them (fabric's ``_get_rank``):
# LOCAL_RANK comes before SLURM_PROCID because SLURM may set the latter without managing the job.
_GLOBAL_RANK_KEYS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
_LOCAL_RANK_KEYS = ("LOCAL_RANK", "SLURM_LOCALID", "JSM_NAMESPACE_LOCAL_RANK")
_WORLD_SIZE_KEYS = ("WORLD_SIZE", "SLURM_NTASKS", "JSM_NAMESPACE_SIZE")


def distributed_is_initialized() -> bool:
    """Whether a ``torch.distributed`` process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def _env_int(keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        value = os.environ.get(key)
        if value is not None and value.strip() != "":
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {key}={value!r} is not an integer") from None
    return default


def global_rank(trainer: Trainer | None = None) -> int:
    """This process's global rank: the trainer's if given, else the process group's, else the launcher's.

    Before the process group exists on a node other than node 0, Lightning's launcher sets
    ``LOCAL_RANK`` and ``NODE_RANK`` but no ``RANK``: the rank is then exact with torchrun's
    ``LOCAL_WORLD_SIZE``, and otherwise a lower bound ``NODE_RANK + LOCAL_RANK`` (never 0, so
    that no process on another node takes itself for the global leader).
    """
    if trainer is not None:
        return int(trainer.global_rank)
    if distributed_is_initialized():
        return dist.get_rank()
    if os.environ.get("RANK", "").strip() == "" and os.environ.get("LOCAL_RANK", "").strip() != "":
        node = _env_int(("NODE_RANK", "GROUP_RANK"), 0)
        if node > 0:
            local = _env_int(("LOCAL_RANK",), 0)
            per_node = _env_int(("LOCAL_WORLD_SIZE",), 0)
            return node * per_node + local if per_node > 0 else node + local
    return _env_int(_GLOBAL_RANK_KEYS, 0)


def local_rank(trainer: Trainer | None = None) -> int:
    """This process's rank on its node (the launcher's ``LOCAL_RANK``; torch has no group call for it)."""
    if trainer is not None:
        return int(trainer.local_rank)
    return _env_int(_LOCAL_RANK_KEYS, 0)


def world_size(trainer: Trainer | None = None) -> int:
    """The number of processes in the job: the trainer's, the process group's, or the launcher's."""
    if trainer is not None:
        return int(trainer.world_size)
    if distributed_is_initialized():
        return dist.get_world_size()
    return _env_int(_WORLD_SIZE_KEYS, 1)


def is_global_leader(trainer: Trainer | None = None) -> bool:
    """Whether this is global rank 0."""
    return global_rank(trainer) == 0


def is_local_leader(trainer: Trainer | None = None) -> bool:
    """Whether this is rank 0 on its node."""
    return local_rank(trainer) == 0


def _leader_only(is_leader: Callable[[], bool], fn: F | None, default: Any) -> Any:
    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # The rank is read at call time, not at decoration time: modules are often imported
            # before the launcher or the strategy has settled which rank this process is.
            if is_leader():
                return func(*args, **kwargs)
            return default

        return wrapper  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate


@overload
def global_leader_only(fn: F) -> F: ...
@overload
def global_leader_only(fn: None = None, *, default: Any = None) -> Callable[[F], F]: ...
def global_leader_only(fn: F | None = None, *, default: Any = None) -> Any:
    """Run ``fn`` on global rank 0 only; other ranks get ``default`` without calling it.

    Usable bare (``@global_leader_only``) or with a default (``@global_leader_only(default=0)``).
    Never call a collective (barrier, broadcast, ``trainer.save_checkpoint``) inside such a
    function: the other ranks will not join it.
    """
    return _leader_only(is_global_leader, fn, default)


@overload
def local_leader_only(fn: F) -> F: ...
@overload
def local_leader_only(fn: None = None, *, default: Any = None) -> Callable[[F], F]: ...
def local_leader_only(fn: F | None = None, *, default: Any = None) -> Any:
    """Run ``fn`` on each node's rank 0 only; other ranks get ``default``. See :func:`global_leader_only`."""
    return _leader_only(is_local_leader, fn, default)


def broadcast_object(obj: T, src: int = 0, trainer: Trainer | None = None) -> T:
    """Return rank ``src``'s ``obj`` on every rank (a collective: every rank must call it).

    With a trainer this is ``trainer.strategy.broadcast`` (which knows the strategy's process
    group and device); without one it uses ``torch.distributed.broadcast_object_list`` on the
    default group. In a single process it returns ``obj`` unchanged. ``obj`` must be picklable.
    """
    if trainer is not None:
        return trainer.strategy.broadcast(obj, src=src)
    if not distributed_is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (a collective: every rank must call it).

    Uses ``torch.distributed.all_gather_object`` on the default group; in a single process it
    returns ``[obj]``. ``obj`` must be picklable.
    """
    if not distributed_is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
