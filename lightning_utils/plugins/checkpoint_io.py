"""``SafetensorsCheckpointIO``: a Lightning ``CheckpointIO`` plugin for ``.sft`` and ``.ckpt``.

``Trainer(plugins=[SafetensorsCheckpointIO()])`` makes every checkpoint the trainer writes or
reads go through :func:`~lightning_utils.io.save_state` / :func:`~lightning_utils.io.load_state`:
the suffix picks the format, so ``.ckpt`` files keep working while ``.sft`` files hold the whole
training state with no pickle. Writes are atomic (temp file beside the target, fsync,
``os.replace``, directory fsync): the temp file is never staged in ``$TMPDIR``, so the final
rename never crosses a filesystem. Paths may be fsspec URLs (``s3://``, ``gs://``, ``az://``...):
saves stream into an upload that appears whole or not at all, as in
:mod:`lightning_utils.io.storage`.

:class:`AsyncCheckpointIO` is Lightning's asynchronous wrapper with one fix: removals are queued
on the same single worker as saves. Lightning's wrapper removes files synchronously on the
caller thread, so ``ModelCheckpoint``'s top-k removal can run before (or during) a queued save
of the file it removes, and the removed file reappears.

Sharded training state (``DTensor`` weights and optimizer moments under FSDP2) goes through
:meth:`SafetensorsCheckpointIO.save_distributed_checkpoint`, called on every rank by
:class:`lightning_utils.strategies.ModelParallelStrategy`: a directory of one safetensors file per
rank, or one consolidated ``.sft`` (see :mod:`lightning_utils.io.sharded`). ``AsyncCheckpointIO``
does the same on its worker thread after copying each rank's local shards to host memory.

This plugin never pickles a ``.sft`` file.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO as _LightningAsyncCheckpointIO
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO

from lightning_utils._internals import replace_wrapped_checkpoint_io
from lightning_utils.io import storage
from lightning_utils.io.sharded import (
    Comm,
    ProcessGroupComm,
    TensorShard,
    checkpoint_root,
    save_consolidated,
    save_sharded,
    to_shards,
)
from lightning_utils.io.skeleton import dict_tag
from lightning_utils.io.state import load_state, save_state


class SafetensorsCheckpointIO(CheckpointIO):
    """Save and load Lightning checkpoints as ``.sft`` (safetensors) or ``.ckpt`` (torch).

    Thread-safe: a removal of a path waits for an in-progress save of that same path.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Condition()
        self._saving: dict[str, int] = {}

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint got storage_options={storage_options!r}, but it takes none; "
                "subclass it if you need per-save options"
            )
        with self._being_saved(path):
            save_state(checkpoint, path)

    def save_distributed_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, *, consolidated: bool = False, group: Any = None
    ) -> None:
        """Save a checkpoint whose tensors may be sharded (``DTensor``); call it on every rank of ``group``.

        ``consolidated=False``: the directory ``path`` with one safetensors file per rank, each
        written by its rank. ``consolidated=True``: one ``.sft`` file written by rank 0, the sharded
        tensors gathered one at a time. ``group``: the ``torch.distributed`` group the ranks
        coordinate on (``None``: the default group, or a single process); a save on a background
        thread needs a group of its own.
        """
        import torch.distributed as dist

        comm = ProcessGroupComm(group) if dist.is_available() and dist.is_initialized() else Comm()
        with self._being_saved(path):
            (save_consolidated if consolidated else save_sharded)(checkpoint, path, comm)

    @contextlib.contextmanager
    def _being_saved(self, path: str | os.PathLike) -> Iterator[None]:
        """Mark ``path`` as being written, so that :meth:`remove_checkpoint` of it waits."""
        key = storage.path_key(path)
        with self._lock:
            self._saving[key] = self._saving.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._saving[key] -= 1
                if not self._saving[key]:
                    del self._saving[key]
                self._lock.notify_all()

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if map_location is None:
            # Lightning's own default: keep every storage on CPU; the strategy moves state later.
            map_location = _keep_on_cpu
        # fit(ckpt_path="last") on object storage names a sharded checkpoint by its index.json
        return load_state(checkpoint_root(path), map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        key = storage.path_key(path)
        with self._lock:
            self._lock.wait_for(lambda: key not in self._saving)
            storage.remove(path)  # a file, a link, a directory or an object (prefix); gone already is fine


def _keep_on_cpu(storage: Any, location: str) -> Any:
    return storage


class AsyncCheckpointIO(_LightningAsyncCheckpointIO):
    """Lightning's ``AsyncCheckpointIO`` with removals ordered after pending saves.

    Use it exactly like Lightning's: ``Trainer(plugins=[AsyncCheckpointIO(SafetensorsCheckpointIO())])``.
    Two differences: ``remove_checkpoint`` is queued on the same single worker thread as the saves
    (so top-k removal never runs before or during the save of the file it removes), and the
    caller-thread snapshot clones each *storage* once, so tied weights and views stay shared in
    the saved file (Lightning's clones every tensor separately). The worker thread and the error
    slot are this class's own; it relies on no private member of Lightning's.
    """

    def __init__(self, checkpoint_io: CheckpointIO | None = None) -> None:
        super().__init__(checkpoint_io)
        self._worker: ThreadPoolExecutor | None = None  # created on first use: a plugin must stay picklable
        self._failure: BaseException | None = None  # raised by a queued call; re-raised on the caller thread

    def _base(self) -> CheckpointIO:
        base = self.checkpoint_io
        assert base is not None, "the strategy sets the wrapped checkpoint_io before any save"
        return base

    def _submit(self, work: Callable[[], None]) -> None:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1)  # one thread: calls run in submission order

        def run() -> None:
            try:
                work()
            except BaseException as ex:  # noqa: BLE001 - re-raised on the caller thread by the next save or teardown
                self._failure = ex

        self._worker.submit(run)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        base = self._base()
        snapshot = _snapshot(checkpoint)  # on the caller thread: later in-place updates are not saved
        self._submit(lambda: base.save_checkpoint(snapshot, path, storage_options=storage_options))
        if self._failure:  # raised by an earlier queued call
            raise self._failure

    def save_distributed_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, **options: Any) -> None:
        """Queue a sharded (or consolidated) save: the caller only waits while this rank's local shards
        are copied to host memory. Pass a ``group`` of its own (the worker thread runs collectives)."""
        base: Any = self._base()
        if not hasattr(base, "save_distributed_checkpoint"):
            raise TypeError(
                f"{type(base).__qualname__} cannot save sharded checkpoints; wrap a SafetensorsCheckpointIO"
            )
        snapshot = _snapshot(to_shards(checkpoint))
        self._submit(lambda: base.save_distributed_checkpoint(snapshot, path, **options))
        if self._failure:
            raise self._failure

    def remove_checkpoint(self, path: str | Path) -> None:
        base = self._base()
        self._submit(lambda: base.remove_checkpoint(path))

    def teardown(self) -> None:
        """Wait for every queued save and removal; raise the error of a failed one."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self._failure:
            raise self._failure


def _snapshot(obj: Any) -> Any:
    """A point-in-time copy of the tensors in ``obj`` that keeps aliasing and object identity.

    A :class:`~lightning_utils.io.sharded.TensorShard` (a rank's block of a sharded tensor) gets
    its block copied into host memory.
    """
    storages: dict[tuple[Any, int, int], Any] = {}
    memo: dict[int, Any] = {}

    def copy(value: Any) -> Any:
        if id(value) in memo:
            return memo[id(value)]
        out: Any
        if isinstance(value, TensorShard):
            out = value.host_copy()
        elif isinstance(value, torch.Tensor):
            t = value.detach()
            conj, neg = t.is_conj(), False
            if conj:
                t = t.conj()
            if t.is_neg():
                neg, t = True, t._neg_view()
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr(), storage.nbytes())
            if key not in storages or storage.nbytes() == 0:
                storages[key] = storage.clone()
            out = torch.empty(0, dtype=t.dtype, device=t.device).set_(
                storages[key], t.storage_offset(), t.shape, t.stride()
            )
            if neg:
                out = out._neg_view()
            if conj:
                out = out.conj()
            if isinstance(value, torch.nn.Parameter):
                out = torch.nn.Parameter(out, requires_grad=value.requires_grad)
            elif value.requires_grad:
                out.requires_grad_(True)
            out.__dict__.update(value.__dict__)
        elif dict_tag(type(value)) is not None:  # the dict types a checkpoint may hold (see skeleton)
            out = type(value)()
            memo[id(value)] = out
            for k, v in value.items():
                out[k] = copy(v)
            if hasattr(value, "_metadata"):
                out._metadata = copy(value._metadata)
            return out
        elif type(value) is list:
            out = []
            memo[id(value)] = out
            out.extend(copy(v) for v in value)
            return out
        elif type(value) is tuple:
            out = tuple(copy(v) for v in value)
        else:
            return value  # scalars, strings, paths...: immutable or not ours to copy
        memo[id(value)] = out
        return out

    return copy(obj)


def _wraps_another(io: Any) -> bool:
    """A wrapper plugin (Lightning's ``AsyncCheckpointIO`` and the like) exposes its base as ``checkpoint_io``."""
    return isinstance(io, CheckpointIO) and hasattr(io, "checkpoint_io")


def ensure_safetensors_checkpoint_io(strategy: Any) -> SafetensorsCheckpointIO:
    """Make ``strategy`` write checkpoints through a :class:`SafetensorsCheckpointIO`.

    Lightning's default ``TorchCheckpointIO`` (bare or inside a wrapper such as
    ``AsyncCheckpointIO``) is swapped for ours, which writes ``.ckpt`` identically and adds
    ``.sft``; Lightning's own ``AsyncCheckpointIO`` becomes ours (see :class:`AsyncCheckpointIO`).
    Any other custom plugin is left alone and raises, since silently writing a torch zip under a
    ``.sft`` name is exactly what this must prevent.
    """
    parent, inner = None, strategy.checkpoint_io
    while _wraps_another(inner):
        parent, inner = inner, inner.checkpoint_io
    if isinstance(inner, SafetensorsCheckpointIO):
        return inner
    if type(inner) is not TorchCheckpointIO:
        raise RuntimeError(
            f"the trainer's checkpoint plugin is {type(inner).__qualname__}, which cannot write '.sft' files; "
            "pass Trainer(plugins=[SafetensorsCheckpointIO()]) (optionally wrapped in AsyncCheckpointIO)"
        )
    ours = SafetensorsCheckpointIO()
    if parent is None:
        strategy.checkpoint_io = ours
    elif type(parent) is _LightningAsyncCheckpointIO:
        # Lightning's wrapper removes files while their saves may still be queued: use ours,
        # which orders removals behind saves. teardown() waits for any save it already queued.
        parent.teardown()
        strategy.checkpoint_io = AsyncCheckpointIO(ours)
    else:
        replace_wrapped_checkpoint_io(parent, ours)  # the wrapper's setter keeps a base already set
    return ours
