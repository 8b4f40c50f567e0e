"""The few collectives a sharded save needs, behind one small interface.

:class:`Comm` is the single-process case (every collective is the identity); :class:`ProcessGroupComm`
runs them on a ``torch.distributed`` process group. A save running on a background thread (an
asynchronous checkpoint) must use a group of its own, not the one training communicates on:
collectives of two threads on one group would interleave. Objects are exchanged with torch's
object collectives (pickled in memory between the ranks, never on disk).

What it must never do: decide anything about the checkpoint; it only moves data between ranks.
"""

from __future__ import annotations

from typing import Any

import torch


class Comm:
    """Collectives among the ranks saving one checkpoint; this base class is a single rank."""

    rank = 0
    world_size = 1

    def broadcast(self, obj: Any) -> Any:
        """``obj`` from rank 0, on every rank."""
        return obj

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (by rank) on rank 0; ``None`` elsewhere."""
        return [obj]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank, on every rank."""
        return [obj]

    def gather_bytes(self, data: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's 1-D ``uint8`` CPU tensor (all of one length) on rank 0; ``None`` elsewhere."""
        return [data]


class ProcessGroupComm(Comm):
    """The collectives on a ``torch.distributed`` group (``None``: the default group); CPU (gloo) groups
    take any tensor, others need the tensors on their device."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._root = dist.get_global_rank(group, 0) if group is not None else 0

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=self._root, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        self._dist.gather_object(obj, out, dst=self._root, group=self.group)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather_bytes(self, data: torch.Tensor) -> list[torch.Tensor] | None:
        out = [torch.empty_like(data) for _ in range(self.world_size)] if self.rank == 0 else None
        self._dist.gather(data, out, dst=self._root, group=self.group)
        return out
