"""Reading a sharded checkpoint directory: any slice of any global tensor, the whole object, or its structure.

:class:`ShardedCheckpoint` opens the index (a directory without one is an incomplete save and
is refused), then opens each shard file only when a tensor stored in it is first needed: its size
must be the one the index records, its header is validated completely
(:func:`lightning_utils.io.safetensors_file.read_header`) and must agree with the index about
every block it holds. Blocks are read through a copy-on-write memory map of the file, so reading
a slice touches only the pages of that slice; a damaged file raises
:class:`~lightning_utils.io.errors.CheckpointFormatError` naming it.

* :meth:`ShardedCheckpoint.load` rebuilds the whole saved object (each sharded tensor assembled
  whole): ``load_state(DIR)`` is this.
* :meth:`ShardedCheckpoint.load_lazy` rebuilds it with a small *handle* in place of every tensor
  stored in several blocks; :func:`lightning_utils.io.sharded.shards.fill` then reads into a
  target only the slice it holds (resharding on load).
* :meth:`ShardedCheckpoint.load_structure` gives the object with ``meta`` tensors of the global
  shapes, reading nothing but the index.

This module never writes and never unpickles anything.
"""

from __future__ import annotations

import io
import json
import math
import mmap as mmap_module
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_utils.io import safetensors_file as sft
from lightning_utils.io.errors import CheckpointFormatError
from lightning_utils.io.map_location import check_map_location, place
from lightning_utils.io.sharded import storage
from lightning_utils.io.sharded.layout import INDEX_NAME, SHARDING_KEY, Chunk, Index, TensorRecord, parse_index
from lightning_utils.io.sharded.shards import map_leaves
from lightning_utils.io.skeleton import SkeletonError, decode


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a sharded checkpoint's index (a complete save)."""
    return storage.is_dir(path) and storage.exists(Path(path) / INDEX_NAME)


@dataclass
class _OpenFile:
    path: str
    file: io.RawIOBase
    header: sft.Header
    entries: dict[str, sft.Entry]
    mapped: mmap_module.mmap | None


class ShardedCheckpoint:
    """A sharded checkpoint directory opened for reading (use as a context manager, or :meth:`close`).

    ``mmap=True``: tensors read whole from one block are copy-on-write views of the file's
    memory map (no copy; in-place changes stay private to the process).
    """

    def __init__(self, path: str | os.PathLike, *, mmap: bool = True) -> None:
        self.path = os.fspath(path)
        self._mmap = mmap
        if not storage.is_dir(path):
            raise FileNotFoundError(f"{self.path}: no such checkpoint directory")
        index_path = Path(path) / INDEX_NAME
        if not storage.exists(index_path):
            raise CheckpointFormatError(
                self.path,
                f"no {INDEX_NAME}: not a lightning-utils sharded checkpoint, or a save that did not finish",
            )
        try:
            doc = json.loads(storage.read_file(index_path))
        except (ValueError, RecursionError) as exc:
            raise CheckpointFormatError(os.fspath(index_path), f"not valid JSON ({exc})") from None
        self.index: Index = parse_index(doc, os.fspath(index_path))
        self._files: dict[int, _OpenFile] = {}
        self._handles: dict[int, str] = {}  # storage address of a handle -> the tensor it stands for

    def __enter__(self) -> ShardedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the files (tensors already read, memory-mapped ones included, stay valid)."""
        for f in self._files.values():
            f.file.close()
        self._files.clear()

    # -- files -----------------------------------------------------------------------------
    def _open(self, i: int) -> _OpenFile:
        opened = self._files.get(i)
        if opened is not None:
            return opened
        record = self.index.files[i]
        path = os.path.join(self.path, record.name)
        if not os.path.isfile(path):
            raise CheckpointFormatError(path, "shard file is missing")
        size = storage.file_size(path)
        if size != record.nbytes:
            raise CheckpointFormatError(
                path, f"shard file is {size} bytes, the index says {record.nbytes} (truncated or replaced)"
            )
        f: Any = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open until close()
        try:
            header = sft.read_header(f, path)
            entries = {e.name: e for e in header.entries}
            self._check_file(i, path, header, entries)
            has_data = any(e.nbytes for e in header.entries)
            mapped = (
                mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_COPY) if self._mmap and has_data else None
            )
        except BaseException:
            f.close()
            raise
        opened = _OpenFile(path, f, header, entries, mapped)
        self._files[i] = opened
        return opened

    def _check_file(self, i: int, path: str, header: sft.Header, entries: dict[str, sft.Entry]) -> None:
        """The file holds exactly the blocks the index places in it, with matching dtype, shape and offsets."""
        try:
            sharding = json.loads((header.metadata or {})[SHARDING_KEY])["tensors"]
        except (KeyError, ValueError, TypeError):
            raise CheckpointFormatError(path, f"shard file has no valid {SHARDING_KEY!r} metadata") from None
        expected = {name: (r, c) for name, r in self.index.tensors.items() for c in r.chunks if c.file == i}
        if set(entries) != set(expected):
            raise CheckpointFormatError(
                path,
                f"shard file holds {len(entries)} tensors, the index places {len(expected)} there "
                f"(e.g. {sorted(set(entries) ^ set(expected))[:3]}): it belongs to another checkpoint",
            )
        for name, (record, chunk) in expected.items():
            entry = entries[name]
            block = sharding.get(name) if isinstance(sharding, dict) else None
            if (
                entry.dtype != record.dtype
                or entry.shape != chunk.shape
                or not isinstance(block, dict)
                or block.get("shape") != list(record.shape)
                or block.get("offsets") != list(chunk.offsets)
            ):
                raise CheckpointFormatError(
                    path, f"tensor {name!r} in the shard file does not match the index (dtype, shape or offsets)"
                )

    def _block(self, name: str, chunk: Chunk) -> torch.Tensor:
        """The stored block ``chunk`` of tensor ``name`` (a memory-map view, or read into fresh memory)."""
        f = self._open(chunk.file)
        entry = f.entries[name]
        return sft.read_entry(f.file, f.header, entry, f.path, f.mapped)

    # -- tensors ---------------------------------------------------------------------------
    def record(self, name: str) -> TensorRecord:
        try:
            return self.index.tensors[name]
        except KeyError:
            raise CheckpointFormatError(
                self.path, f"the skeleton refers to tensor {name!r}, which the index lacks"
            ) from None

    def read_block(
        self, name: str, offsets: tuple[int, ...], shape: tuple[int, ...], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The block of global tensor ``name`` at ``offsets`` of extent ``shape``, read from the blocks overlapping it.

        ``out`` (the right shape and dtype, on any device) receives it in place.
        """
        record = self.record(name)
        if len(offsets) != len(record.shape) or any(o + s > n for o, s, n in zip(offsets, shape, record.shape)):
            raise ValueError(
                f"{self.path}: block {list(offsets)}+{list(shape)} lies outside tensor {name!r} {list(record.shape)}"
            )
        if out is None:
            out = torch.empty(shape, dtype=record.dtype)
        elif tuple(out.shape) != tuple(shape) or out.dtype != record.dtype:
            raise ValueError(
                f"{self.path}: tensor {name!r}: out is {out.dtype} {list(out.shape)}, expected {record.dtype} {list(shape)}"
            )
        covered = 0
        for chunk in record.chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            hi = [min(o + s, c + d) for o, s, c, d in zip(offsets, shape, chunk.offsets, chunk.shape)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            block = self._block(name, chunk)
            src = block[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk.offsets))]
            out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))].copy_(src)
            covered += math.prod(b - a for a, b in zip(lo, hi))
        if covered != math.prod(shape):  # the index's coverage check makes this unreachable for valid files
            raise CheckpointFormatError(self.path, f"tensor {name!r}: its blocks do not cover the requested slice")
        return out

    def read(self, name: str) -> torch.Tensor:
        """The whole global tensor ``name`` (a memory-map view when it is stored in one block)."""
        record = self.record(name)
        whole = record.single_chunk()
        if whole is not None:
            return self._block(name, whole)
        return self.read_block(name, (0,) * len(record.shape), record.shape)

    # -- the saved object ------------------------------------------------------------------
    def _decode(self, entry: Callable[[str, str], torch.Tensor]) -> Any:
        try:
            return decode(self.index.skeleton, entry)
        except CheckpointFormatError:
            raise
        except (SkeletonError, ValueError, RecursionError) as exc:
            raise CheckpointFormatError(self.path, f"corrupted lightning-utils skeleton: {exc}") from None

    def load(self, map_location: Any = None) -> Any:
        """The saved object, every tensor whole (what ``load_state`` of a single-file save gives)."""
        check_map_location(map_location)
        return self._decode(lambda name, location: place(self.read(name), location, map_location))

    def load_lazy(self) -> Any:
        """The saved object with a handle (a 1-element tensor expanded to the global shape) for
        every tensor stored in several blocks; :meth:`handle_name` tells which tensor a handle is.

        Tensors stored in one block are memory-map views, as in :meth:`load`.
        """
        multi = {n for n, r in self.index.tensors.items() if r.single_chunk() is None and math.prod(r.shape) > 0}
        _check_plain_nodes(self.index.skeleton, multi, self.path)

        def entry(name: str, location: str) -> torch.Tensor:
            record = self.record(name)
            if name not in multi:
                return self.read(name)
            cell = torch.zeros((1,) * len(record.shape), dtype=record.dtype)
            self._handles[cell.untyped_storage().data_ptr()] = name
            return cell.expand(record.shape)

        return self._decode(entry)

    def handle_name(self, t: torch.Tensor) -> str | None:
        """The tensor a :meth:`load_lazy` handle stands for; ``None`` for any other tensor."""
        storage = t.untyped_storage()
        if t.device.type != "cpu" or storage.nbytes() != t.element_size():  # a handle's storage is one element
            return None
        return self._handles.get(storage.data_ptr())

    def materialize(self, obj: Any) -> Any:
        """``obj`` with every handle replaced by its whole tensor."""
        return map_leaves(
            obj,
            lambda t, path: self.read(self.handle_name(t)),  # type: ignore[arg-type]
            lambda x: isinstance(x, torch.Tensor) and self.handle_name(x) is not None,
        )

    def load_structure(self) -> Any:
        """The saved object with ``meta`` tensors of the global shapes (reads only the index)."""
        return self._decode(
            lambda name, location: torch.empty(self.record(name).shape, dtype=self.record(name).dtype, device="meta")
        )


def _check_plain_nodes(node: Any, multi: set[str], path: str) -> None:
    """Tensor nodes naming a tensor stored in several blocks must take it as it is (no view of its bytes):
    the writer only writes such nodes, and a handle must never be read as data."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, list):
            stack.extend(n)
        elif isinstance(n, dict):
            if n.get("$") == "tensor" and n.get("e") in multi and any(k in n for k in ("off", "st", "neg", "conj")):
                raise CheckpointFormatError(path, f"corrupted skeleton: a view of the sharded tensor {n['e']!r}")
            stack.extend(n.values())


def load_sharded(path: str | os.PathLike, map_location: Any = None, *, mmap: bool = True) -> Any:
    """The object saved in the sharded checkpoint directory ``path``, every tensor whole."""
    with ShardedCheckpoint(path, mmap=mmap) as checkpoint:
        return checkpoint.load(map_location)


def load_sharded_structure(path: str | os.PathLike) -> Any:
    """The object saved in ``path`` with ``meta`` tensors of the global shapes (reads only the index)."""
    with ShardedCheckpoint(path) as checkpoint:
        return checkpoint.load_structure()
