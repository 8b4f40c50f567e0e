"""Streaming safetensors writers for weight exports: one tensor in memory at a time.

A safetensors file starts with a header that lists every tensor's name, dtype, shape and byte
range, so a writer that is handed all tensors at once (``safetensors.torch.save_file``,
``transformers``' ``save_pretrained``) needs the whole model in memory. Here the header is built
from :class:`TensorSpec` records alone (name, dtype, shape), and each tensor's bytes are written
as it arrives, so the caller can produce tensors one by one (gather a sharded parameter, write
it, free it) and the writer never holds more than the tensor it is writing.

* :class:`StreamingSafetensorsWriter` writes one file to an open binary file object (a local
  file or an upload stream); :func:`stream_safetensors` does it atomically to a path or an fsspec
  URL (the file or object appears complete or not at all, as
  :func:`lightning_utils.io.storage.atomic_writer` guarantees; on object storage the bytes stream
  into a multipart upload through a few bounded part buffers).
* :func:`staged_directory` builds a directory of files (a Hugging Face export): locally next to
  its final name, renamed into place only when everything in it is written and flushed; at a URL
  (object storage has no renames) in place, file by file, each file whole or absent, after
  deleting an earlier export of that name.

This module never copies a tensor except to make a non-contiguous one writable, never unpickles,
and never leaves a partial file under its final name (nor, locally, a partial directory).
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lightning_utils.io import storage
from lightning_utils.io.atomic import TEMP_PREFIX, fsync_directory
from lightning_utils.io.safetensors_file import build_header, byte_sink, data_order, itemsize
from lightning_utils.io.state import RESERVED_METADATA, encode_metadata

__all__ = [
    "RESERVED_METADATA",
    "RemoteDirectory",
    "StreamingSafetensorsWriter",
    "TensorSpec",
    "encode_metadata",
    "file_order",
    "staged_directory",
    "stream_safetensors",
]


@dataclass(frozen=True)
class TensorSpec:
    """What a safetensors header records about one tensor: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def file_order(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The order the tensors take in the file: by decreasing element size (so that every entry
    starts aligned to its dtype), the given order among equal sizes."""
    return [specs[i] for i in data_order([s.dtype for s in specs])]


class StreamingSafetensorsWriter:
    """Write a safetensors file whose tensors arrive one at a time, in :func:`file_order`.

    The header is written on construction, from ``specs`` (already in file order); then
    :meth:`write` takes each tensor in that order and :meth:`finish` checks that none is missing.
    Each tensor must have its spec's dtype and shape; it may live on any device (it is copied to
    the CPU if it is not there; a CPU tensor that is contiguous is written without any copy).
    """

    def __init__(self, f: BinaryIO, specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> None:
        self._specs = list(specs)
        self._next = 0
        header = build_header([(s.name, s.dtype, s.shape) for s in self._specs], metadata)
        f.write(header)
        f.flush()
        self._sink = byte_sink(f)
        self.bytes_written = 0

    @property
    def expected(self) -> TensorSpec | None:
        """The spec of the tensor :meth:`write` takes next (``None`` once all are written)."""
        return self._specs[self._next] if self._next < len(self._specs) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.expected
        if spec is None or spec.name != name:
            raise ValueError(f"tensor {name!r} written out of order: expected {spec.name if spec else 'nothing'!r}")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name!r}: got {tensor.dtype} {tuple(tensor.shape)}, the header says {spec.dtype} {spec.shape}"
            )
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel():
            self._sink(tensor.detach().reshape(-1).view(torch.uint8).numpy().data)
        self.bytes_written += spec.nbytes
        self._next += 1

    def finish(self) -> None:
        if self.expected is not None:
            missing = [s.name for s in self._specs[self._next :]]
            raise ValueError(f"{len(missing)} tensor(s) were never written, first {missing[0]!r}")


@contextlib.contextmanager
def stream_safetensors(
    path: str | os.PathLike[str],
    specs: Sequence[TensorSpec],
    metadata: Mapping[str, str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[StreamingSafetensorsWriter]:
    """Write ``path`` (a local path or an fsspec URL) atomically with a :class:`StreamingSafetensorsWriter`
    (``specs`` in file order).

    The file appears under ``path`` only when the block exits normally and every tensor was
    written; otherwise the staged file is removed (the upload aborted) and an existing ``path``
    is left untouched. ``storage_options`` go to the fsspec filesystem of a URL.
    """
    with storage.atomic_writer(path, storage_options) as f:
        writer = StreamingSafetensorsWriter(f, specs, metadata)
        yield writer
        writer.finish()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RemoteDirectory:
    """A directory at an fsspec URL that :func:`staged_directory` fills in place.

    ``directory / name`` is the URL of the file ``name`` in it (as ``Path / name`` is for a local
    stage), and records ``name`` as written by this export.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.names: set[str] = set()

    def __truediv__(self, name: str) -> str:
        self.names.add(name)
        return storage.join(self.url, name)

    def __str__(self) -> str:
        return self.url


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> Iterator[Any]:
    """A fresh directory to fill, renamed to ``path`` when the block exits normally.

    The directory is staged next to ``path`` (same filesystem, so the rename is atomic). An
    existing ``path`` is replaced: it is renamed aside, the new directory renamed in, and the old
    one deleted, so ``path`` never holds a mix of old and new files. If the block raises, the
    staged directory is deleted and ``path`` is untouched. Every file in the stage, and the
    directories, are synced to disk before the rename. Yields the stage's ``Path``.

    ``path`` an fsspec URL (object storage has no rename): yields a :class:`RemoteDirectory`;
    the block writes each file in place (each one whole or not at all, see
    :func:`lightning_utils.io.storage.atomic_writer`), so it must write the file that marks the
    directory complete (an index) last. An existing directory there is deleted first (its
    ``*index.json`` files first), so that a reader never finds one export's index naming
    another's files; if the block raises, what it wrote is deleted.
    """
    if storage.is_url(path):
        url = os.fspath(path)
        if storage.is_file(url, storage_options):
            raise FileExistsError(f"{url}: exists and is not a directory; cannot export a directory there")
        before = sorted(storage.listdir(url, storage_options), key=lambda name: not name.endswith("index.json"))
        for name in before:  # the indexes first: the files they name are not complete any more
            storage.remove(storage.join(url, name), storage_options)
        directory = RemoteDirectory(url)
        try:
            yield directory
        except BaseException:
            for name in directory.names:
                with contextlib.suppress(Exception):  # best effort: the error raised says what failed
                    storage.remove(storage.join(url, name), storage_options)
            raise
        return
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final}: exists and is not a directory; cannot export a directory there")
    final.parent.mkdir(parents=True, exist_ok=True)
    stem = final.name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    stage = final.parent / f"{TEMP_PREFIX}{secrets.token_hex(6)}.{stem}"
    stage.mkdir()
    try:
        yield stage
        for child in stage.iterdir():
            if child.is_file():
                _fsync_file(child)
        fsync_directory(stage)
        if final.exists():
            old = final.parent / f"{TEMP_PREFIX}{secrets.token_hex(6)}.old.{stem}"
            os.replace(final, old)
            os.replace(stage, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    fsync_directory(final.parent)
