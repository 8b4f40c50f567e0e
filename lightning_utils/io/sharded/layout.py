"""The layout of a sharded ``.sft`` checkpoint directory: file names, the index, and its validation.

A sharded checkpoint is a directory (``step=100.sft/``) holding one safetensors file per rank
(``shard-00000-of-00002.safetensors``, ...; on object storage each save's files also carry the
save's id, ``shard-00000-of-00002.3f9c01ab52de.safetensors``) and one JSON index (``index.json``). Each file holds
the blocks of the global tensors that its rank owns, under the tensors' entry names, and its
header metadata records, for every entry, the global shape and the offsets of the block. The
index lists the files with their sizes, every global tensor with its dtype, global shape and
blocks (``chunks``), and the JSON skeleton of the whole saved object (the same skeleton a
single-file ``.sft`` stores; its tensor nodes name global tensors). The index is written last:
a directory without it is incomplete. ``docs/sft-format.md`` ("Sharded checkpoints") is the
written description.

This module only names, describes and validates; it never touches storage.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from lightning_utils.io.errors import CheckpointFormatError
from lightning_utils.io.safetensors_file import DTYPE_FROM_NAME, NAME_FROM_DTYPE

INDEX_NAME = "index.json"
INDEX_FORMAT = "lightning_utils.sharded"
INDEX_VERSION = 1
# Header metadata key of each shard file: JSON {"rank", "world_size", "tensors": {name: {"shape", "offsets"}}}.
SHARDING_KEY = "lightning_utils.sharding"
# A save on object storage adds its save id (lower-case hex): shard-00000-of-00002.3f9c01ab52de.safetensors
_FILE_NAME = re.compile(r"^shard-(\d{5,})-of-(\d{5,})(\.[0-9a-f]{1,64})?\.safetensors$")


def shard_file_name(rank: int, world_size: int, save_id: str | None = None) -> str:
    """The name of rank ``rank``'s file in a checkpoint written by ``world_size`` ranks.

    ``save_id`` (lower-case hex) makes the names of one save unique: a save on object storage,
    which cannot rename, writes its files beside those of the checkpoint it replaces.
    """
    if save_id is None:
        return f"shard-{rank:05d}-of-{world_size:05d}.safetensors"
    if not re.fullmatch(r"[0-9a-f]{1,64}", save_id):
        raise ValueError(f"save_id must be 1 to 64 lower-case hex digits, got {save_id!r}")
    return f"shard-{rank:05d}-of-{world_size:05d}.{save_id}.safetensors"


def is_shard_file_name(name: str) -> bool:
    """Whether ``name`` is the name of a shard file (with or without a save id)."""
    return bool(_FILE_NAME.match(name))


@dataclass(frozen=True)
class Chunk:
    """One stored block of a global tensor: ``shape`` elements starting at ``offsets``, in file ``file``."""

    file: int  # position in Index.files
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorRecord:
    """A global tensor of the checkpoint and the blocks it is stored as."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    def single_chunk(self) -> Chunk | None:
        """The chunk holding the whole tensor, if it is stored in one piece."""
        if len(self.chunks) == 1 and self.chunks[0].shape == self.shape:
            return self.chunks[0]
        return None


@dataclass(frozen=True)
class FileRecord:
    name: str
    nbytes: int


@dataclass(frozen=True)
class Index:
    world_size: int
    files: tuple[FileRecord, ...]
    tensors: dict[str, TensorRecord]
    skeleton: dict[str, Any]


def index_document(
    world_size: int, files: list[FileRecord], tensors: list[TensorRecord], skeleton: dict[str, Any]
) -> dict[str, Any]:
    """The JSON object of ``index.json`` (member order as written)."""
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "world_size": world_size,
        "files": [{"name": f.name, "bytes": f.nbytes} for f in files],
        "tensors": {
            t.name: {
                "dtype": NAME_FROM_DTYPE[t.dtype],
                "shape": list(t.shape),
                "chunks": [{"file": c.file, "offsets": list(c.offsets), "shape": list(c.shape)} for c in t.chunks],
            }
            for t in tensors
        },
        "skeleton": skeleton,
    }


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(x: object, what: str, fail: Any) -> tuple[int, ...]:
    if not isinstance(x, list) or not all(_is_int(v) and 0 <= v < 2**63 for v in x):
        raise fail(f"{what} must be a list of non-negative integers, got {x!r}")
    return tuple(x)


def check_coverage(record: TensorRecord, fail: Any) -> None:
    """The chunks of ``record`` lie inside the tensor and hold exactly its number of elements."""
    for c in record.chunks:
        if len(c.offsets) != len(record.shape) or len(c.shape) != len(record.shape):
            raise fail(f"tensor {record.name!r}: a chunk has {len(c.shape)} dimensions, the tensor {len(record.shape)}")
        if any(o + s > n for o, s, n in zip(c.offsets, c.shape, record.shape)):
            raise fail(
                f"tensor {record.name!r}: chunk at {list(c.offsets)} of shape {list(c.shape)} lies outside {list(record.shape)}"
            )
    stored = sum(c.numel for c in record.chunks)
    if stored != math.prod(record.shape):
        raise fail(
            f"tensor {record.name!r}: its chunks hold {stored} elements, the tensor has {math.prod(record.shape)} "
            "(shards missing or overlapping)"
        )


def parse_index(doc: object, path: str) -> Index:
    """Validate the parsed ``index.json`` of the checkpoint at ``path``; :class:`CheckpointFormatError` if damaged."""

    def fail(reason: str) -> CheckpointFormatError:
        return CheckpointFormatError(path, f"invalid {INDEX_NAME}: {reason}")

    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise fail(f'not a lightning-utils sharded checkpoint index (no "format": "{INDEX_FORMAT}")')
    if doc.get("version") != INDEX_VERSION:
        raise fail(f"unsupported version {doc.get('version')!r} (this reader knows version {INDEX_VERSION})")
    world_size = doc.get("world_size")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise fail(f"world_size must be a positive integer, got {world_size!r}")
    raw_files = doc.get("files")
    if not isinstance(raw_files, list):
        raise fail("'files' must be a list")
    files: list[FileRecord] = []
    for f in raw_files:
        name, nbytes = (f.get("name"), f.get("bytes")) if isinstance(f, dict) else (None, None)
        if not isinstance(name, str) or not _FILE_NAME.match(name) or not isinstance(nbytes, int) or nbytes < 8:
            raise fail(f"bad file record {f!r}")
        files.append(FileRecord(name, nbytes))
    raw_tensors = doc.get("tensors")
    if not isinstance(raw_tensors, dict):
        raise fail("'tensors' must be an object")
    tensors: dict[str, TensorRecord] = {}
    for name, t in raw_tensors.items():
        if not isinstance(t, dict) or t.get("dtype") not in DTYPE_FROM_NAME or not isinstance(t.get("chunks"), list):
            raise fail(f"bad record for tensor {name!r}")
        shape = _ints(t.get("shape"), f"tensor {name!r} shape", fail)
        chunks = []
        for c in t["chunks"]:
            if not isinstance(c, dict) or not _is_int(c.get("file")) or not 0 <= c["file"] < len(files):
                raise fail(f"tensor {name!r}: bad chunk {c!r}")
            offsets = _ints(c.get("offsets"), f"tensor {name!r} chunk offsets", fail)
            chunk_shape = _ints(c.get("shape"), f"tensor {name!r} chunk shape", fail)
            chunks.append(Chunk(c["file"], offsets, chunk_shape))
        record = TensorRecord(name, DTYPE_FROM_NAME[t["dtype"]], shape, tuple(chunks))
        check_coverage(record, fail)
        tensors[name] = record
    skeleton = doc.get("skeleton")
    if not isinstance(skeleton, dict):
        raise fail("'skeleton' must be an object")
    return Index(world_size, tuple(files), tensors, skeleton)


def file_sharding(
    rank: int, world_size: int, blocks: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
) -> dict[str, Any]:
    """The ``SHARDING_KEY`` metadata of a shard file: ``blocks`` maps entry name -> (global shape, offsets)."""
    return {
        "rank": rank,
        "world_size": world_size,
        "tensors": {
            name: {"shape": list(shape), "offsets": list(offsets)} for name, (shape, offsets) in blocks.items()
        },
    }
