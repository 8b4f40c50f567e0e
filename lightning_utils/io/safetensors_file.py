"""Reading and writing the safetensors file format, byte for byte.

Layout (written down in ``docs/sft-format.md``): an 8-byte little-endian header
length ``N``, ``N`` bytes of JSON header (``{"__metadata__": {str: str}, name: {"dtype",
"shape", "data_offsets": [begin, end]}}``, padded with spaces), then the data buffer. Files
written here are read by ``safetensors.safe_open``/``load_file`` and vice versa.

Why our own code rather than ``safetensors.torch.save_file``: we lay the file out first (so its
size is known before a byte is written) and then write each tensor straight from its memory into
the file or upload stream (no serialised copy of the checkpoint in RAM), inside an atomic writer,
and we read each entry with one ``readinto`` (or ranged reads, for object storage) into its own
tensor. The reader validates the header completely *before* allocating anything, so a garbage,
truncated or lying file raises :class:`CheckpointFormatError` and never makes a huge allocation.
Loaded tensors can be copy-on-write views of a memory map of the file, so loading costs no copy;
writers must therefore replace files by rename (as ours do), never truncate them. This module
never unpickles, never executes anything from a file and never opens a file itself.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import torch

from lightning_utils.io.atomic import write_all
from lightning_utils.io.errors import CheckpointFormatError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers too
_STREAM_CHUNK = 64 << 20  # bytes handed to a non-file writer per call (it copies what it buffers)
_INT64_LIMIT = 2**63
METADATA_KEY = "__metadata__"

# safetensors dtype names <-> torch dtypes (only those this torch build has).
_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}  # fmt: skip
DTYPE_FROM_NAME: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _DTYPE_NAMES.items() if hasattr(torch, v)}
NAME_FROM_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_FROM_NAME.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor's record in a safetensors header."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offset into the data buffer
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    entries: list[Entry]  # in header (file text) order
    metadata: dict[str, str] | None
    data_start: int  # absolute file offset of the data buffer


def _bytes_view(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    flat = t.reshape(-1).view(torch.uint8)
    return flat.numpy().data.cast("B")


@dataclass(frozen=True)
class FilePlan:
    """A safetensors file laid out before any byte is written: its size is known up front."""

    prefix: bytes  # the 8-byte header length and the padded header
    tensors: list[torch.Tensor]  # in data-buffer order
    size: int  # the whole file's size in bytes


def build_header(
    entries: Sequence[tuple[str, torch.dtype, Sequence[int]]], metadata: Mapping[str, str] | None
) -> bytes:
    """The first bytes of a safetensors file whose data buffer holds ``entries`` back to back, in
    this order: the 8-byte little-endian header length and the JSON header, padded with spaces so
    the data buffer starts 8-byte aligned.

    Every writer of ``.sft`` files builds its header here. ``ValueError`` for a tensor named
    ``__metadata__``, a name given twice or a header over :data:`MAX_HEADER_BYTES`; ``TypeError``
    for a dtype safetensors cannot store or metadata that does not map strings to strings.
    """
    header: dict[str, object] = {}
    if metadata is not None:
        if not _is_str_map(dict(metadata)):
            raise TypeError("safetensors metadata must map strings to strings")
        header[METADATA_KEY] = dict(metadata)
    offset = 0
    for name, dtype, shape in entries:
        if name == METADATA_KEY:
            raise ValueError(f"a tensor cannot be named {METADATA_KEY!r}: safetensors reserves that key for metadata")
        if name in header:
            raise ValueError(f"tensor name {name!r} appears twice")
        if dtype not in NAME_FROM_DTYPE:
            raise TypeError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        nbytes = math.prod(shape) * itemsize(dtype)
        header[name] = {
            "dtype": NAME_FROM_DTYPE[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # pad so the data buffer starts 8-byte aligned
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"safetensors header would be {len(raw)} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    return struct.pack("<Q", len(raw)) + raw


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return dtype.itemsize


def data_order(dtypes: Sequence[torch.dtype]) -> list[int]:
    """The order every writer here lays entries out in: by decreasing element size (so that each
    entry starts aligned to its dtype), ties in the given order."""
    return sorted(range(len(dtypes)), key=lambda i: -itemsize(dtypes[i]))


def byte_sink(f: BinaryIO) -> Callable[[memoryview], None]:
    """A function writing every byte of a buffer to ``f``: ``os.write`` calls on its descriptor for a
    real file (unbuffered; flush ``f`` first if it buffers), otherwise ``f.write`` calls of at most
    64 MiB each (an upload stream copies what it is handed into its part buffers)."""
    try:
        fd: int | None = f.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        fd = None
    if fd is not None:
        descriptor = fd
        return lambda view: write_all(descriptor, view)

    def write(view: memoryview) -> None:
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        for start in range(0, len(view), _STREAM_CHUNK):
            f.write(view[start : start + _STREAM_CHUNK])

    return write


def plan_file(tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None) -> FilePlan:
    """Check ``tensors`` and lay them out (header, data order, size) without writing anything.

    ``tensors`` are contiguous CPU tensors with unique names; they are laid out by decreasing
    element size so that every entry is aligned to its dtype.
    """
    for name, t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"tensor {name!r}: expected a contiguous CPU tensor")
    order = data_order([t.dtype for _, t in tensors])
    prefix = build_header([(tensors[i][0], tensors[i][1].dtype, tensors[i][1].shape) for i in order], metadata)
    data = sum(t.numel() * t.element_size() for _, t in tensors)
    return FilePlan(prefix, [tensors[i][1] for i in order], len(prefix) + data)


def write_plan(f: BinaryIO, plan: FilePlan) -> None:
    """Write the planned file to ``f``: each tensor straight from its memory, no serialised copy.

    A real file (one with a ``fileno``) gets ``os.write`` calls on its descriptor; any other
    binary writer (an upload stream) gets ``write`` calls of at most 64 MiB each.
    """
    f.write(plan.prefix)
    f.flush()
    sink = byte_sink(f)
    for t in plan.tensors:
        if t.numel():
            sink(_bytes_view(t))


def write_file(f: BinaryIO, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None) -> None:
    """Write a safetensors file to the binary file object ``f`` (:func:`plan_file`, then :func:`write_plan`)."""
    write_plan(f, plan_file(tensors, metadata))


def _fail(path: str, reason: str) -> CheckpointFormatError:
    return CheckpointFormatError(path, f"not a valid safetensors file: {reason}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_str_map(x: object) -> bool:
    return isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in x.items())


def read_header(f: BinaryIO, path: str) -> Header:
    """Parse and fully validate the header of the safetensors file open as ``f``."""
    size = os.fstat(f.fileno()).st_size
    n = header_length(f.read(8), size, path)
    raw = f.read(n)
    if len(raw) != n:
        raise _fail(path, "file shrank while reading the header")
    return parse_header(raw, size, path)


def header_length(prefix: bytes, size: int, path: str) -> int:
    """The header length ``N`` that the file's first 8 bytes give, checked against the file's ``size``."""
    if len(prefix) < 8:
        raise _fail(path, f"file is {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > size:
        raise _fail(path, f"header length {n} runs past the end of the {size}-byte file (truncated?)")
    return int(n)


def parse_header(raw: bytes, size: int, path: str) -> Header:
    """Validate the header bytes ``raw`` (``N`` bytes, after the length) of a file of ``size`` bytes."""
    n = len(raw)
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("header does not start with '{'")
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"header is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(doc, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = doc.pop(METADATA_KEY, None)
    if metadata is not None and not _is_str_map(metadata):
        raise _fail(path, "__metadata__ must map strings to strings")
    data_len = size - 8 - n
    entries: list[Entry] = []
    for name, info in doc.items():
        if not isinstance(info, dict):
            raise _fail(path, f"entry {name!r} is not an object")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPE_FROM_NAME:
            raise _fail(path, f"entry {name!r} has an unsupported dtype {dtype_name!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < _INT64_LIMIT for d in shape):
            raise _fail(path, f"entry {name!r} has an invalid shape {shape!r}")
        if math.prod(d for d in shape if d) >= _INT64_LIMIT:  # zero-size tensors too: strides must fit
            raise _fail(path, f"entry {name!r} has a shape {shape!r} too large for a tensor")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise _fail(path, f"entry {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise _fail(
                path,
                f"entry {name!r} data_offsets {offsets} fall outside the {data_len}-byte data buffer "
                "(truncated, or a corrupted header)",
            )
        dtype = DTYPE_FROM_NAME[dtype_name]
        size = itemsize(dtype)
        if math.prod(shape) * size != end - begin:
            raise _fail(
                path,
                f"entry {name!r}: shape {shape} of {dtype_name} needs {math.prod(shape) * size} bytes, offsets give {end - begin}",
            )
        entries.append(Entry(name, dtype, tuple(shape), begin, end))
    # The entries must tile the data buffer exactly, as the safetensors library requires.
    cursor = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != cursor:
            raise _fail(path, f"entry {e.name!r} starts at {e.begin}, expected {cursor} (overlap or gap)")
        cursor = e.end
    if cursor != data_len:
        raise _fail(
            path, f"entries cover {cursor} bytes but the data buffer holds {data_len} (truncated or trailing bytes)"
        )
    return Header(entries, metadata, 8 + n)


def check_bool_entry(buf: torch.Tensor, entry: Entry, path: str) -> None:
    """``BOOL`` entries must hold only the bytes 0 and 1 (``buf``: the entry's bytes as uint8)."""
    if entry.dtype == torch.bool and bool((buf > 1).any()):
        raise _fail(path, f"entry {entry.name!r} is BOOL but holds bytes other than 0 and 1")


def read_entry(
    f: io.RawIOBase | io.BufferedIOBase, header: Header, entry: Entry, path: str, mapped: mmap.mmap | None = None
) -> torch.Tensor:
    """One entry as a CPU tensor with a storage of its own.

    With ``mapped`` (a copy-on-write ``mmap`` of the file) the tensor is a zero-copy view of the
    page cache: writes to it stay private to this process and never reach the file. Otherwise
    the bytes are read with one ``readinto`` into fresh memory.
    """
    start = header.data_start + entry.begin
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    if mapped is not None and start % itemsize(entry.dtype) == 0:
        buf = torch.frombuffer(mapped, dtype=torch.uint8, count=entry.nbytes, offset=start)
    else:
        buf = torch.empty(entry.nbytes, dtype=torch.uint8)
        view = buf.numpy().data.cast("B")
        f.seek(start)
        done = 0
        while done < entry.nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise _fail(path, f"entry {entry.name!r} is truncated")
            done += got
    check_bool_entry(buf, entry, path)
    return buf.view(entry.dtype).reshape(entry.shape)
