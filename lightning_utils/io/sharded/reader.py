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
import itertools
import json
import math
import mmap as mmap_module
import os
from collections.abc import Callable, Iterator
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
from lightning_utils.io.state import SAFETENSORS_SUFFIXES


def is_sharded_checkpoint(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``path`` is a directory holding a sharded checkpoint's index (a complete save).

    At a URL: whether ``path/index.json`` exists (a prefix without it is an unfinished save).
    """
    if storage.is_url(path):
        return storage.exists(storage.join(path, INDEX_NAME), storage_options)
    return storage.is_dir(path) and storage.exists(Path(path) / INDEX_NAME)


def checkpoint_root(path: str | os.PathLike) -> str | os.PathLike:
    """The checkpoint directory when ``path`` names its ``index.json`` (what ``fit(ckpt_path="last")``
    resolves to on object storage, where a directory has no modification time); else ``path``."""
    text = os.fspath(path).rstrip("/")
    parent, name = (text.rsplit("/", 1) + [""])[:2] if "/" in text else ("", text)
    if name == INDEX_NAME and parent.lower().endswith(SAFETENSORS_SUFFIXES):
        return parent
    return path


# Shard-file reads at a URL: runs of wanted bytes (rows of a slice) are fetched together, gaps
# included, while the range stays within twice their bytes plus this much; a request costs more
# than a few KiB of transfer, a range much longer than the bytes it serves costs more than a request.
_GAP_BYTES = 4096


@dataclass
class _OpenFile:
    path: str
    file: io.RawIOBase | None  # None at a URL: blocks are read with ranged reads
    header: sft.Header
    entries: dict[str, sft.Entry]
    mapped: mmap_module.mmap | None


class ShardedCheckpoint:
    """A sharded checkpoint directory opened for reading (use as a context manager, or :meth:`close`).

    ``mmap=True``: tensors read whole from one block are copy-on-write views of the file's
    memory map (no copy; in-place changes stay private to the process).

    ``path`` may be an fsspec URL (``s3://bucket/run/last.sft``): each shard file's header is
    read with ranged reads, then only the bytes of the blocks (or parts of blocks) asked for,
    straight into their tensors; nothing is copied to local disk and ``mmap`` does not apply.
    ``storage_options`` go to the URL's fsspec filesystem.
    """

    def __init__(
        self, path: str | os.PathLike, *, mmap: bool = True, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.path = os.fspath(path)
        self._mmap = mmap
        self._remote = storage.is_url(path)
        self._options = storage_options
        not_finished = f"no {INDEX_NAME}: not a lightning-utils sharded checkpoint, or a save that did not finish"
        index_path = os.fspath(storage.join(path, INDEX_NAME))
        if self._remote:
            try:
                raw = storage.read_file(index_path, storage_options)
            except FileNotFoundError:
                if storage.is_dir(path, storage_options):
                    raise CheckpointFormatError(self.path, not_finished) from None
                raise FileNotFoundError(f"{self.path}: no such checkpoint directory") from None
        else:
            if not storage.is_dir(path):
                raise FileNotFoundError(f"{self.path}: no such checkpoint directory")
            if not storage.exists(index_path):
                raise CheckpointFormatError(self.path, not_finished)
            raw = storage.read_file(index_path)
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise CheckpointFormatError(index_path, f"not valid JSON ({exc})") from None
        self.index: Index = parse_index(doc, index_path)
        self._files: dict[int, _OpenFile] = {}
        self._handles: dict[int, str] = {}  # storage address of a handle -> the tensor it stands for

    def __enter__(self) -> ShardedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the files (tensors already read, memory-mapped ones included, stay valid)."""
        for f in self._files.values():
            if f.file is not None:
                f.file.close()
        self._files.clear()

    # -- files -----------------------------------------------------------------------------
    def _open(self, i: int) -> _OpenFile:
        opened = self._files.get(i)
        if opened is not None:
            return opened
        record = self.index.files[i]
        if self._remote:
            opened = self._open_remote(i)
            self._files[i] = opened
            return opened
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

    def _open_remote(self, i: int) -> _OpenFile:
        """A shard file at a URL: its size and header (two small ranged reads), checked as a local one."""
        from lightning_utils.io.state import remote_header  # state imports this package

        record = self.index.files[i]
        path = os.fspath(storage.join(self.path, record.name))
        try:
            size = storage.file_size(path, self._options)
        except FileNotFoundError:
            raise CheckpointFormatError(path, "shard file is missing") from None
        if size != record.nbytes:
            raise CheckpointFormatError(
                path, f"shard file is {size} bytes, the index says {record.nbytes} (truncated or replaced)"
            )
        # The length first, then exactly the header: the data is read only where it is needed.
        header = remote_header(path, self._options, size=size, first_read=8)
        entries = {e.name: e for e in header.entries}
        self._check_file(i, path, header, entries)
        return _OpenFile(path, None, header, entries, None)

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
        if f.file is None:
            out = torch.empty(chunk.shape, dtype=entry.dtype)
            self._read_remote(
                f, entry, chunk, chunk.offsets, tuple(o + s for o, s in zip(chunk.offsets, chunk.shape)), out
            )
            return out
        return sft.read_entry(f.file, f.header, entry, f.path, f.mapped)

    def _read_remote(
        self,
        f: _OpenFile,
        entry: sft.Entry,
        chunk: Chunk,
        lo: tuple[int, ...] | list[int],
        hi: tuple[int, ...] | list[int],
        dst: torch.Tensor,
    ) -> None:
        """Read the elements ``lo..hi`` (global indices) of the block ``chunk`` into ``dst``, fetching
        only their bytes: the region is cut into runs contiguous in the file, runs close together
        are fetched as one range (at most twice their bytes plus 4 KiB), the ranges in parallel, straight into ``dst`` when
        it is a contiguous CPU tensor of the entry's dtype (into one buffer otherwise)."""
        shape, start = chunk.shape, [a - o for a, o in zip(lo, chunk.offsets)]
        extent = [b - a for a, b in zip(lo, hi)]
        size = sft.itemsize(entry.dtype)
        strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
        d = len(shape) - 1  # dims after d are read whole: a run spans dims d.. (d = -1: the whole block)
        while d >= 0 and extent[d] == shape[d]:
            d -= 1
        run = math.prod(extent[d:]) * size if d >= 0 else math.prod(shape) * size
        base = f.header.data_start + entry.begin + (start[d] * strides[d] * size if d >= 0 else 0)
        firsts = [
            base + size * sum((start[j] + i) * strides[j] for j, i in enumerate(index))
            for index in itertools.product(*(range(n) for n in extent[: max(d, 0)]))
        ]
        # is_contiguous() holds for a one-element view of any stride; a byte view needs stride 1
        direct = dst.device.type == "cpu" and dst.dtype == entry.dtype and dst.is_contiguous() and dst.numel() > 1
        target = dst if direct else torch.empty(extent, dtype=entry.dtype)
        into = target.reshape(-1).view(torch.uint8)
        pieces: list[tuple[int, memoryview]] = []
        copies: list[tuple[torch.Tensor, int, int, int]] = []  # scratch, its offset in the file, runs k..l
        k = 0
        while k < len(firsts):
            end = k + 1  # runs k..end-1 are fetched as one range, at most 2x their bytes plus _GAP_BYTES
            while end < len(firsts) and firsts[end] + run - firsts[k] <= 2 * run * (end + 1 - k) + _GAP_BYTES:
                end += 1
            if end == k + 1:
                pieces.append((firsts[k], into[k * run : (k + 1) * run].numpy().data.cast("B")))
            else:
                scratch = torch.empty(firsts[end - 1] + run - firsts[k], dtype=torch.uint8)
                pieces.append((firsts[k], scratch.numpy().data.cast("B")))
                copies.append((scratch, firsts[k], k, end))
            k = end
        try:
            storage.read_into(f.path, pieces, self._options)
        except EOFError as exc:
            raise CheckpointFormatError(f.path, f"not a valid safetensors file: {exc}") from None
        for scratch, offset, first, last in copies:
            for r in range(first, last):
                into[r * run : (r + 1) * run] = scratch[firsts[r] - offset : firsts[r] - offset + run]
        sft.check_bool_entry(into, entry, f.path)
        if not direct:
            dst.copy_(target)

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
            dst = out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))]
            if self._remote:  # only the bytes of the overlap are fetched
                f = self._open(chunk.file)
                self._read_remote(f, f.entries[name], chunk, lo, hi, dst)
            else:
                block = self._block(name, chunk)
                dst.copy_(block[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk.offsets))])
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

        Tensors stored in one block are memory-map views, as in :meth:`load`. At a URL, where
        nothing is mapped, those are handles as well (unless a skeleton node takes a view of
        their bytes), so that nothing is fetched before :func:`~lightning_utils.io.sharded.fill`
        or :meth:`materialize` asks for it.
        """
        multi = {n for n, r in self.index.tensors.items() if r.single_chunk() is None and math.prod(r.shape) > 0}
        _check_plain_nodes(self.index.skeleton, multi, self.path)
        lazy = multi
        if self._remote:  # a tensor stored whole is a handle too: a rank reads only its slice of it
            viewed = _viewed_entries(self.index.skeleton)
            lazy = multi | {n for n, r in self.index.tensors.items() if math.prod(r.shape) > 0 and n not in viewed}

        def entry(name: str, location: str) -> torch.Tensor:
            record = self.record(name)
            if name not in lazy:
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


def _tensor_nodes(node: Any) -> Iterator[dict[str, Any]]:
    """Every tensor node of a skeleton."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, list):
            stack.extend(n)
        elif isinstance(n, dict):
            if n.get("$") == "tensor":
                yield n
            stack.extend(n.values())


def _check_plain_nodes(node: Any, multi: set[str], path: str) -> None:
    """Tensor nodes naming a tensor stored in several blocks must take it as it is (no view of its bytes):
    the writer only writes such nodes, and a handle must never be read as data."""
    for n in _tensor_nodes(node):
        if n.get("e") in multi and any(k in n for k in ("off", "st", "neg", "conj")):
            raise CheckpointFormatError(path, f"corrupted skeleton: a view of the sharded tensor {n['e']!r}")


def _viewed_entries(node: Any) -> set[str]:
    """The tensors some skeleton node builds from their bytes rather than taking them as they are."""
    return {
        str(n.get("e")) for n in _tensor_nodes(node) if any(k in n for k in ("off", "sh", "st", "dt", "neg", "conj"))
    }


def load_sharded(
    path: str | os.PathLike,
    map_location: Any = None,
    *,
    mmap: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """The object saved in the sharded checkpoint directory ``path`` (local or a URL), every tensor whole."""
    with ShardedCheckpoint(path, mmap=mmap, storage_options=storage_options) as checkpoint:
        return checkpoint.load(map_location)


def load_sharded_structure(path: str | os.PathLike, *, storage_options: dict[str, Any] | None = None) -> Any:
    """The object saved in ``path`` with ``meta`` tensors of the global shapes (reads only the index)."""
    with ShardedCheckpoint(path, storage_options=storage_options) as checkpoint:
        return checkpoint.load_structure()
