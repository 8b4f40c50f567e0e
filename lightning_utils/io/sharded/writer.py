"""Saving an object that holds sharded tensors: one file per rank (sharded) or one file (consolidated).

Both take the whole object a rank holds (a Lightning checkpoint with ``DTensor`` weights and
optimizer moments, say) and must be called on every rank of ``comm`` with objects of the same
structure:

* :func:`save_sharded` writes a sharded checkpoint directory: every rank writes the blocks it
  owns to its own file, in parallel, straight from their memory; rank 0 also writes the plain
  (replicated) tensors and, once every rank reported its file written and fsynced, the index
  with the skeleton, then publishes the staged directory under its final name in one rename.
  At an fsspec URL (object storage cannot rename) the files are uploaded under their final
  prefix, named uniquely for this save, and the index, uploaded last, publishes them; the files
  of the checkpoint it replaces are deleted only after that.
* :func:`save_consolidated` writes one ordinary ``.sft`` file on rank 0: the header first (the
  global shapes are known), then each sharded tensor gathered from the ranks one at a time and
  written before the next is gathered.

A failure on any rank (a value the skeleton cannot hold, a full disk) is raised on every rank,
and the previous checkpoint under the same name is left as it was. This module never pickles
anything to storage and never runs a collective outside ``comm``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_utils.io.atomic import write_all
from lightning_utils.io.safetensors_file import data_order
from lightning_utils.io.sharded import storage
from lightning_utils.io.sharded.comm import Comm
from lightning_utils.io.sharded.layout import (
    INDEX_NAME,
    SHARDING_KEY,
    Chunk,
    FileRecord,
    TensorRecord,
    check_coverage,
    file_sharding,
    index_document,
    shard_file_name,
)
from lightning_utils.io.sharded.shards import TensorShard, leaves, map_leaves, to_shards
from lightning_utils.io.sharded.stream import EntrySpec, write_entries
from lightning_utils.io.skeleton import encode

log = logging.getLogger(__name__)


def _collective(path: Any, run: Any, *args: Any) -> Any:
    """Run one of ``comm``'s collectives; a rank that died or hung surfaces as an error naming the save."""
    try:
        return run(*args)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{path}: saving the checkpoint failed: a rank stopped taking part ({exc}); the previous checkpoint "
            "under this name is unchanged"
        ) from exc


def _is_shard(x: object) -> bool:
    return isinstance(x, TensorShard)


@dataclass
class _Plan:
    """What rank 0 decides before anything is written."""

    names: list[str]  # the entry name of each shard, in walk order
    plain: dict[str, torch.Tensor]  # the entries of the non-sharded tensors, CPU and contiguous
    skeleton: dict[str, Any]


def _plan(obj: Any, shards: list[TensorShard]) -> _Plan:
    """Encode ``obj`` with a small placeholder per shard, so the skeleton names every shard's entry."""
    placeholders = {id(s): torch.tensor([i], dtype=torch.int64) for i, s in enumerate(shards)}
    by_storage = {p.untyped_storage().data_ptr(): i for i, p in enumerate(placeholders.values())}
    tree = map_leaves(obj, lambda s, path: placeholders[id(s)], _is_shard)
    entries, skeleton = encode(tree)
    names: list[str | None] = [None] * len(shards)
    plain: dict[str, torch.Tensor] = {}
    for name, t in entries.items():
        i = by_storage.get(t.untyped_storage().data_ptr()) if t.numel() else None
        if i is not None:
            names[i] = name
        else:
            plain[name] = t
    assert all(n is not None for n in names), "every shard is reached by the walk that encodes the object"
    return _Plan([n for n in names if n is not None], plain, skeleton)


def _start(obj: Any, comm: Comm, path: Any) -> tuple[list[TensorShard], list[list[Any]], _Plan | None, dict[str, Any]]:
    """Collect the shards, check every rank holds the same ones, and let rank 0 plan.

    Returns the shards, every rank's blocks (``[rank][shard]``: ``[offsets, shape]``, or ``None``
    where that rank stores nothing of that shard), rank 0's plan (``None`` elsewhere) and what
    rank 0 shares with every rank (the entry names, a token naming the staging area).
    """
    shards = leaves(obj, _is_shard)
    described = [
        [list(s.shape), str(s.dtype), [list(s.offsets), list(s.local.shape)] if s.stored else None] for s in shards
    ]
    everyone = _collective(path, comm.all_gather, described)
    for rank, theirs in enumerate(everyone):
        if [d[:2] for d in theirs] != [d[:2] for d in everyone[0]]:
            raise RuntimeError(
                f"{path}: rank {rank} holds other sharded tensors than rank 0 ({len(theirs)} vs "
                f"{len(everyone[0])}, or other shapes or dtypes); every rank must save the same structure"
            )
    blocks = [[d[2] for d in theirs] for theirs in everyone]
    plan: _Plan | None = None
    start: dict[str, Any] | None = None
    failure: BaseException | None = None
    if comm.rank == 0:
        token = None
        try:
            plan = _plan(obj, shards)
            token = _fresh_token(path)
        except (TypeError, ValueError, OSError) as exc:
            failure = exc
        start = {
            "error": f"{type(failure).__name__}: {failure}" if failure else None,
            "names": plan.names if plan else None,
            "token": token,
        }
    start = _collective(path, comm.broadcast, start)
    assert start is not None
    if failure is not None:
        raise failure
    if start["error"]:
        raise RuntimeError(f"{path}: rank 0 cannot save this checkpoint: {start['error']}")
    return shards, blocks, plan, start


def _fresh_token(path: Any) -> str:
    """A new save's token. At a URL it also names the save's files beside those of the checkpoint
    being replaced, so it must not be the id of any file already there."""
    token = storage.new_token()
    if storage.is_url(path):
        taken = storage.list_dir(path)
        while any(f".{token}." in name for name in taken):
            token = storage.new_token()
    return token


def _finish(comm: Comm, outcome: str | None, local_failure: BaseException | None, path: Any) -> None:
    """Every rank learns rank 0's outcome; each raises its own failure, or rank 0's."""
    outcome = _collective(path, comm.broadcast, outcome)
    if local_failure is not None:
        raise local_failure
    if outcome:
        raise RuntimeError(f"{path}: the checkpoint was not saved: {outcome}")


def save_sharded(obj: Any, path: str | os.PathLike, comm: Comm | None = None) -> None:
    """Save ``obj`` (``DTensor`` or :class:`TensorShard` leaves allowed) as a sharded checkpoint directory ``path``.

    ``path`` may be an fsspec URL (``s3://bucket/run/step=100.sft``): each rank then uploads its
    own file straight under ``path`` (streamed, whole or not at all), under a name unique to this
    save; rank 0 uploads the index once every file is up, and only then deletes the files of the
    checkpoint it replaced (see :func:`_publish_in_place`).
    """
    comm = comm or Comm()
    remote = storage.is_url(path)
    path = storage.path_or_url(path)
    shards, _, plan, start = _start(to_shards(obj), comm, path)
    names: list[str] = start["names"]
    if remote:
        save_id: str | None = start["token"]
        directory: Any = path
    else:
        save_id, directory = None, storage.staging_path(path, start["token"])
    file_name = shard_file_name(comm.rank, comm.world_size, save_id)
    local_failure: BaseException | None = None
    try:
        specs: list[EntrySpec] = []
        blocks: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        chunks: dict[str, list[list[int]]] = {}
        for name, s in zip(names, shards):
            if s.stored:
                specs.append(EntrySpec(name, s.dtype, tuple(s.local.shape), s.local))
                blocks[name] = (s.shape, s.offsets)
                chunks[name] = [list(s.offsets), list(s.local.shape)]
        if plan is not None:  # rank 0: the tensors that are not sharded are stored once, here
            for name, t in plan.plain.items():
                if t.numel():
                    specs.append(EntrySpec(name, t.dtype, tuple(t.shape), t))
                    blocks[name] = (tuple(t.shape), (0,) * t.dim())
                    chunks[name] = [[0] * t.dim(), list(t.shape)]
        metadata = {
            "format": "pt",
            SHARDING_KEY: json.dumps(file_sharding(comm.rank, comm.world_size, blocks), separators=(",", ":")),
        }
        storage.make_dir(directory, durable=False)
        nbytes = storage.write_file(storage.join(directory, file_name), lambda f: write_entries(f, specs, metadata))
        report: dict[str, Any] = {"bytes": nbytes, "chunks": chunks}
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which aborts the save on every rank
        local_failure = exc
        report = {"error": f"rank {comm.rank}: {type(exc).__name__}: {exc}"}
    reports = _collective(path, comm.gather, report)
    outcome: str | None = None
    if plan is not None:
        assert reports is not None
        files = [shard_file_name(r, comm.world_size, save_id) for r in range(comm.world_size)]
        try:
            errors = [r["error"] for r in reports if "error" in r]
            if errors:
                raise RuntimeError("; ".join(errors))
            data = _index_bytes(files, reports, names, shards, plan, path)
            if remote:
                _publish_in_place(directory, files, data)
            else:
                storage.write_file(
                    storage.join(directory, INDEX_NAME), lambda f: write_all(f.fileno(), memoryview(data))
                )  # the commit marker: last
                storage.sync_dir(directory)
                storage.publish(directory, path)
        except Exception as exc:  # noqa: BLE001 - every rank raises it
            outcome = (
                str(exc) if local_failure is None and isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
            )
            local_failure = local_failure or exc
            if remote:
                _remove_quietly([storage.join(directory, name) for name in files])
            else:
                storage.remove(directory)
    _finish(comm, outcome, local_failure, path)


def _publish_in_place(directory: str, files: list[str], index: bytes) -> None:
    """Make the uploaded ``files`` (this save's, uniquely named) the checkpoint at the URL ``directory``.

    Object storage cannot rename a directory, so the save is published by its index: one object
    written in one request, which replaces the previous checkpoint's index whole. Until it lands,
    the previous index and the files it names are untouched (a reader sees the previous
    checkpoint, or none if there was none). Raises only if the index did not land (the caller
    then deletes this save's files); once it has, every other object under the prefix (the
    previous checkpoint's files, those of an interrupted save) and an object named like the
    directory itself are deleted, best effort: a failure there is logged, and the save stands.
    """
    target = storage.join(directory, INDEX_NAME)
    try:
        storage.write_file(target, lambda f: f.write(index))  # the commit marker: last
    except Exception:
        if not _landed(target, index):  # the request may have failed after the server stored it
            raise
    _remove_replaced(directory, files)


def _landed(target: str, data: bytes) -> bool:
    try:
        return storage.read_file(target) == data
    except Exception:  # noqa: BLE001 - unreadable: not known to have landed
        return False


def _remove_replaced(directory: str, files: list[str]) -> None:
    keep = {INDEX_NAME, *files}
    try:
        stale = [name for name in storage.list_dir(directory) if name not in keep]
        storage.remove_shadowed(directory, "directory")
    except Exception as exc:  # noqa: BLE001 - the checkpoint is published; leftovers are never read
        log.warning("%s: saved, but the files it replaced could not be listed for deletion (%s)", directory, exc)
        return
    _remove_quietly([storage.join(directory, name) for name in stale])


def _remove_quietly(paths: list[Any]) -> None:
    """Delete ``paths``, best effort: a file left behind is never read (no index names it), and the
    next save of this checkpoint deletes it."""
    for p in paths:
        with contextlib.suppress(Exception):
            storage.remove(p)


def _index_bytes(
    file_names: list[str], reports: list[Any], names: list[str], shards: list[TensorShard], plan: _Plan, path: Any
) -> bytes:
    world_size = len(file_names)
    files = [FileRecord(file_names[r], report["bytes"]) for r, report in enumerate(reports)]
    found: dict[str, list[Chunk]] = {}
    for r, report in enumerate(reports):
        for name, (offsets, shape) in report["chunks"].items():
            found.setdefault(name, []).append(Chunk(r, tuple(offsets), tuple(shape)))
    records = [TensorRecord(n, s.dtype, s.shape, tuple(found.get(n, ()))) for n, s in zip(names, shards)]
    records += [TensorRecord(n, t.dtype, tuple(t.shape), tuple(found.get(n, ()))) for n, t in plan.plain.items()]

    def fail(reason: str) -> RuntimeError:
        return RuntimeError(f"{path}: the ranks' blocks do not form the tensors: {reason}")

    for record in records:
        check_coverage(record, fail)
    doc = index_document(world_size, files, records, plan.skeleton)
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _shard_bytes(s: TensorShard) -> torch.Tensor:
    return s.local.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def save_consolidated(obj: Any, path: str | os.PathLike, comm: Comm | None = None) -> None:
    """Save ``obj`` as one ``.sft`` file written by rank 0, gathering one sharded tensor at a time.

    The file is exactly what :func:`lightning_utils.io.save_state` writes for the same object
    with every sharded tensor whole. ``path`` may be an fsspec URL (one streamed upload by rank 0).
    """
    from lightning_utils.io.state import SKELETON_KEY

    comm = comm or Comm()
    remote = storage.is_url(path)
    path = storage.path_or_url(path)
    shards, layouts, plan, start = _start(to_shards(obj), comm, path)
    names: list[str] = start["names"]
    order = data_order([s.dtype for s in shards])

    def gather(i: int) -> torch.Tensor | None:
        s = shards[i]
        itemsize = s.local.element_size()
        blocks = [(r, layout[i]) for r, layout in enumerate(layouts) if layout[i] is not None]
        width = max((math.prod(shape) * itemsize for _, (_, shape) in blocks), default=0)
        received = None
        if width:
            send = torch.zeros(width, dtype=torch.uint8)
            if s.stored:
                data = _shard_bytes(s)
                send[: data.numel()].copy_(data)
            received = _collective(path, comm.gather_bytes, send)
        if comm.rank != 0:
            return None
        full = torch.empty(s.shape, dtype=s.dtype)
        covered = 0
        for r, (offsets, shape) in blocks:
            n = math.prod(shape)
            assert received is not None
            block = received[r][: n * itemsize].view(s.dtype).reshape(shape)
            full[tuple(slice(o, o + d) for o, d in zip(offsets, shape))] = block
            covered += n
        if covered != full.numel():
            raise RuntimeError(f"tensor {names[i]!r}: the ranks' blocks hold {covered} of its {full.numel()} elements")
        return full

    local_failure: BaseException | None = None
    outcome: str | None = None
    if plan is None:
        for i in order:
            gather(i)
    else:
        produced = 0

        def source(i: int) -> Any:
            def produce() -> torch.Tensor:
                nonlocal produced
                produced += 1
                out = gather(i)
                assert out is not None
                return out

            return produce

        specs = [EntrySpec(n, s.dtype, s.shape, source(i)) for i, (n, s) in enumerate(zip(names, shards))]
        specs += [EntrySpec(n, t.dtype, tuple(t.shape), t) for n, t in plan.plain.items()]
        skeleton = json.dumps(plan.skeleton, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
        metadata = {"format": "pt", SKELETON_KEY: skeleton}
        stage = path if remote else storage.staging_path(path, start["token"])  # an upload is atomic by itself
        try:
            if not remote:
                storage.make_dir(Path(path).parent)
            storage.write_file(stage, lambda f: write_entries(f, specs, metadata))
            if not remote:
                storage.publish(stage, path)
        except Exception as exc:  # noqa: BLE001 - every rank raises it
            local_failure = exc
            outcome = f"{type(exc).__name__}: {exc}"
            if not remote:
                storage.remove(stage)
            for i in order[produced:]:  # the other ranks still send every remaining tensor
                gather(i)
    _finish(comm, outcome, local_failure, path)
