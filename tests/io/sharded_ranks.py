"""Ranks as threads for the tests of ``lightning_utils.io.sharded``: an in-memory ``Comm`` and a runner."""

from __future__ import annotations

import threading

from lightning_utils.io.sharded import Comm


class ThreadComm(Comm):
    """The collectives among threads standing for ranks."""

    def __init__(self, rank: int, world_size: int, shared: dict) -> None:
        self.rank, self.world_size, self._shared = rank, world_size, shared

    def _exchange(self, obj):
        barrier, slots = self._shared["barrier"], self._shared["slots"]
        barrier.wait()
        slots[self.rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    def broadcast(self, obj):
        return self._exchange(obj)[0]

    def gather(self, obj):
        out = self._exchange(obj)
        return out if self.rank == 0 else None

    def all_gather(self, obj):
        return self._exchange(obj)

    def gather_bytes(self, data):
        out = self._exchange(data.clone())
        return out if self.rank == 0 else None


def on_ranks(world_size: int, fn) -> list[BaseException | None]:
    """Run ``fn(comm)`` on ``world_size`` threads; each rank's exception (or None)."""
    shared = {"barrier": threading.Barrier(world_size, timeout=30), "slots": [None] * world_size}
    errors: list[BaseException | None] = [None] * world_size

    def run(rank: int) -> None:
        try:
            fn(ThreadComm(rank, world_size, shared))
        except BaseException as exc:
            errors[rank] = exc  # the others still finish their collectives (or time out on the barrier)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return errors
