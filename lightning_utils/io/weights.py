"""Streaming safetensors writers for weight exports: one tensor in memory at a time.

A safetensors file starts with a header that lists every tensor's name, dtype, shape and byte
range, so a writer that is handed all tensors at once (``safetensors.torch.save_file``,
``transformers``' ``save_pretrained``) needs the whole model in memory. Here the header is built
from :class:`TensorSpec` records alone (name, dtype, shape), and each tensor's bytes are written
as it arrives, so the caller can produce tensors one by one (gather a sharded parameter, write
it, free it) and the writer never holds more than the tensor it is writing.

* :class:`StreamingSafetensorsWriter` writes one file to an open binary file object;
  :func:`stream_safetensors` does it atomically to a path (the file appears complete or not at
  all, as :func:`lightning_utils.io.atomic.atomic_write` guarantees).
* :func:`staged_directory` builds a directory of files (a Hugging Face export) next to its final
  name and renames it into place only when everything in it is written and flushed.

This module never copies a tensor except to make a non-contiguous one writable, never unpickles,
and never leaves a partial file or directory under its final name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lightning_utils.io.atomic import TEMP_PREFIX, atomic_write, fsync_directory, write_all
from lightning_utils.io.jsonio import json_dumps
from lightning_utils.io.safetensors_file import MAX_HEADER_BYTES, METADATA_KEY, NAME_FROM_DTYPE
from lightning_utils.io.state import JSON_KEYS_KEY, SKELETON_KEY

__all__ = [
    "StreamingSafetensorsWriter",
    "TensorSpec",
    "encode_metadata",
    "file_order",
    "staged_directory",
    "stream_safetensors",
]

RESERVED_METADATA = ("format", "module", SKELETON_KEY, JSON_KEYS_KEY)


@dataclass(frozen=True)
class TensorSpec:
    """What a safetensors header records about one tensor: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def file_order(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The order the tensors take in the file: by decreasing element size (so that every entry
    starts aligned to its dtype), the given order among equal sizes."""
    return sorted(specs, key=lambda s: -_itemsize(s.dtype))


def encode_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Safetensors metadata (strings only) for a weights file, encoded as
    :func:`lightning_utils.io.save_weights` encodes it: ``"format": "pt"`` (what Hugging Face
    loaders look for), strings as they are, ``None`` dropped, anything else as JSON with its key
    listed, so that :func:`lightning_utils.io.load_state` gives back exactly these values.
    ``ValueError`` for a reserved key (``format`` may only be ``"pt"``)."""
    meta = {"format": "pt"}
    encoded: list[str] = []
    for key, value in (metadata or {}).items():
        if key == "format" and value == "pt":
            continue
        if key in RESERVED_METADATA:
            raise ValueError(f"metadata key {key!r} is reserved ({', '.join(RESERVED_METADATA)})")
        if value is None:
            continue
        if isinstance(value, str):
            meta[str(key)] = value
        else:
            meta[str(key)] = json_dumps(value)
            encoded.append(str(key))
    if encoded:
        meta[JSON_KEYS_KEY] = json_dumps(encoded)
    return meta


def _header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map strings to strings")
        header[METADATA_KEY] = dict(metadata)
    offset = 0
    for spec in specs:
        if spec.name == METADATA_KEY:
            raise ValueError(f"a tensor cannot be named {METADATA_KEY!r}: safetensors reserves that key for metadata")
        if spec.name in header:
            raise ValueError(f"tensor name {spec.name!r} appears twice")
        if spec.dtype not in NAME_FROM_DTYPE:
            raise TypeError(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be stored in safetensors")
        header[spec.name] = {
            "dtype": NAME_FROM_DTYPE[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # the data buffer starts 8-byte aligned
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"safetensors header would be {len(raw)} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    return len(raw).to_bytes(8, "little") + raw


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
        self._fd = f.fileno()
        f.write(_header(self._specs, metadata))
        f.flush()
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
            write_all(self._fd, tensor.detach().reshape(-1).view(torch.uint8).numpy().data)
        self.bytes_written += spec.nbytes
        self._next += 1

    def finish(self) -> None:
        if self.expected is not None:
            missing = [s.name for s in self._specs[self._next :]]
            raise ValueError(f"{len(missing)} tensor(s) were never written, first {missing[0]!r}")


@contextlib.contextmanager
def stream_safetensors(
    path: str | os.PathLike[str], specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None
) -> Iterator[StreamingSafetensorsWriter]:
    """Write ``path`` atomically with a :class:`StreamingSafetensorsWriter` (``specs`` in file order).

    The file appears under ``path`` only when the block exits normally and every tensor was
    written; otherwise the staged file is removed and an existing ``path`` is left untouched.
    """
    with atomic_write(path) as f:
        writer = StreamingSafetensorsWriter(f, specs, metadata)
        yield writer
        writer.finish()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh directory to fill, renamed to ``path`` when the block exits normally.

    The directory is staged next to ``path`` (same filesystem, so the rename is atomic). An
    existing ``path`` is replaced: it is renamed aside, the new directory renamed in, and the old
    one deleted, so ``path`` never holds a mix of old and new files. If the block raises, the
    staged directory is deleted and ``path`` is untouched. Every file in the stage, and the
    directories, are synced to disk before the rename.
    """
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
