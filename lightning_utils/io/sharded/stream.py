"""Writing a safetensors file whose tensors arrive one at a time, through one bounded staging buffer.

The header of a safetensors file only needs each entry's name, dtype and shape, so it is written
first; then each entry's data is produced (a tensor already in memory, or a callable that
gathers it from the other ranks) and written straight from its memory when it is in host memory,
or through one reusable host buffer when it lives on an accelerator. The layout is the one
:func:`lightning_utils.io.safetensors_file.write_file` writes (entries by decreasing element size,
data buffer 8-byte aligned), so every reader of ``.sft`` files reads these.

What it must never do: hold more than one produced tensor (plus the staging buffer) at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import torch

from lightning_utils.io.safetensors_file import build_header, byte_sink, data_order, itemsize

STAGING_BYTES = 64 << 20  # accelerator tensors are copied to the host in pieces of at most this size


@dataclass(frozen=True)
class EntrySpec:
    """One entry to write: its data is ``source`` itself or what ``source()`` returns when its turn comes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: torch.Tensor | Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def write_entries(f: BinaryIO, specs: Sequence[EntrySpec], metadata: dict[str, str] | None) -> None:
    """Write a safetensors file of ``specs`` to ``f``: an unbuffered binary file, or any binary
    writer without a descriptor (an upload stream).

    Sources are produced in :func:`data_order`, each written and released before the next.
    """
    order = data_order([s.dtype for s in specs])
    sink = byte_sink(f)
    sink(memoryview(build_header([(specs[i].name, specs[i].dtype, specs[i].shape) for i in order], metadata)))
    staging: torch.Tensor | None = None
    for i in order:
        spec = specs[i]
        t = spec.source() if callable(spec.source) else spec.source
        if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
            raise ValueError(
                f"tensor {spec.name!r}: got {t.dtype} {list(t.shape)}, the header says {spec.dtype} {list(spec.shape)}"
            )
        if not t.numel():
            continue
        if t.device.type == "cpu":
            sink(_bytes(t.contiguous()))
        else:
            staging = _write_through(sink, t, staging)
        del t


def _bytes(t: torch.Tensor) -> memoryview:
    return t.reshape(-1).view(torch.uint8).numpy().data.cast("B")


def _write_through(sink: Callable[[memoryview], None], t: torch.Tensor, staging: torch.Tensor | None) -> torch.Tensor:
    """Write an accelerator tensor piece by piece through one host buffer (allocated once, reused)."""
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    if staging is None or staging.numel() < min(STAGING_BYTES, flat.numel()):
        staging = torch.empty(min(STAGING_BYTES, flat.numel()), dtype=torch.uint8, pin_memory=True)
    for start in range(0, flat.numel(), staging.numel()):
        piece = flat[start : start + staging.numel()]
        buf = staging[: piece.numel()]
        buf.copy_(piece)
        sink(_bytes(buf))
    return staging
