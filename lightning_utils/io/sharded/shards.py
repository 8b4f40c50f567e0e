"""Sharded tensors as the writer sees them (:class:`TensorShard`), and reading back into sharded targets.

A ``DTensor`` is turned into a :class:`TensorShard`: this rank's block of the global tensor
(the local tensor, on whatever device it lives), the global shape, the block's offsets, and
whether this rank is the one that stores it (a block replicated over some mesh dimension is
stored once, by the replica at coordinate 0). The writer, the asynchronous copy and the
consolidating gather only ever see this form, so they need no process mesh.

:func:`fill` is the other direction: copy into a target (a ``DTensor``'s local block, or a plain
tensor) the part of a saved global tensor it covers, from a stored checkpoint (only that slice is
read) or from a whole tensor.

What it must never do: communicate (no collective is run here), or copy a tensor that it is only
asked to describe.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lightning_utils.io.skeleton import dict_tag

if TYPE_CHECKING:
    from lightning_utils.io.sharded.reader import ShardedCheckpoint


@dataclass
class TensorShard:
    """This rank's block of a global tensor."""

    local: torch.Tensor  # the block, shape = its extent in each dimension
    shape: tuple[int, ...]  # the global tensor's shape
    offsets: tuple[int, ...]  # where the block starts in the global tensor
    owner: bool = True  # False where another rank stores this same (replicated) block

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def stored(self) -> bool:
        """Whether this rank writes the block (it owns it and it is not empty)."""
        return self.owner and self.local.numel() > 0

    def host_copy(self) -> TensorShard:
        """The same shard with its block copied into fresh host memory (pinned when it comes from an accelerator)."""
        src = self.local
        if src.device.type == "cpu":
            copy = src.clone(memory_format=torch.contiguous_format)
        else:
            copy = torch.empty(src.shape, dtype=src.dtype, pin_memory=torch.cuda.is_available())
            copy.copy_(src)
        return TensorShard(copy, self.shape, self.offsets, self.owner)


def _is_dtensor(x: object) -> bool:
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(x, dtensor)


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def local_block(t: Any, where: str = "tensor") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(offsets, shape)`` of the block of the global tensor that ``t`` holds on this rank.

    A plain tensor holds all of itself. A ``DTensor`` holds one contiguous block (every placement
    is ``Shard(d)`` or ``Replicate()``); other placements raise ``ValueError`` naming ``where``.
    """
    if not _is_dtensor(t):
        return (0,) * t.dim(), tuple(t.shape)
    from torch.distributed.tensor import Replicate, Shard

    for p in t.placements:
        if type(p) is not Shard and not isinstance(p, Replicate):
            raise ValueError(
                f"{where}: a DTensor with placement {p} ({type(p).__name__}) cannot be stored as one block per rank "
                "(only Shard(dim) and Replicate() placements can); redistribute it first"
            )
    try:
        (chunk,) = t.__create_chunk_list__()  # the protocol torch.distributed.checkpoint plans with
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return tuple(int(o) for o in chunk.offsets), tuple(int(s) for s in chunk.sizes)


def to_shard(t: Any, where: str = "tensor") -> TensorShard:
    """The :class:`TensorShard` of a ``DTensor`` (no copy: ``local`` is its local tensor)."""
    from torch.distributed.tensor import Replicate

    offsets, shape = local_block(t, where)
    local = t.to_local().detach()
    if tuple(local.shape) != shape:  # uneven sharding pads nothing in FSDP2, but say so if it ever does
        raise ValueError(f"{where}: local tensor of shape {list(local.shape)} for a block of shape {list(shape)}")
    coordinate = t.device_mesh.get_coordinate()
    owner = coordinate is not None and all(c == 0 for c, p in zip(coordinate, t.placements) if isinstance(p, Replicate))
    return TensorShard(local, tuple(t.shape), offsets, owner)


def map_leaves(obj: Any, fn: Callable[[Any, tuple[Any, ...]], Any], is_leaf: Callable[[Any], bool]) -> Any:
    """A copy of the containers of ``obj`` (dicts of the types a checkpoint may hold, lists,
    tuples) with every leaf ``x`` for which ``is_leaf(x)`` replaced by ``fn(x, key_path)``.

    Containers and leaves reached twice stay one object; an ``OrderedDict`` keeps its
    ``_metadata``; everything else is shared with ``obj``, not copied.
    """
    memo: dict[int, Any] = {}

    def walk(value: Any, path: tuple[Any, ...]) -> Any:
        key = id(value)
        if key in memo:
            return memo[key]
        if is_leaf(value):
            out = fn(value, path)
        elif dict_tag(type(value)) is not None:
            out = type(value)()
            memo[key] = out
            for k, v in value.items():
                out[k] = walk(v, path + (k,))
            if type(value) is OrderedDict and hasattr(value, "_metadata"):
                out._metadata = value._metadata
            return out
        elif type(value) is list:
            out = []
            memo[key] = out
            out.extend(walk(v, path + (i,)) for i, v in enumerate(value))
            return out
        elif type(value) is tuple:
            out = tuple(walk(v, path + (i,)) for i, v in enumerate(value))
        else:
            return value
        memo[key] = out
        return out

    return walk(obj, ())


def leaves(obj: Any, is_leaf: Callable[[Any], bool]) -> list[Any]:
    """The distinct leaves of ``obj`` for which ``is_leaf`` holds, in walk order (dict order, depth first)."""
    found: dict[int, Any] = {}

    def visit(x: Any, path: tuple[Any, ...]) -> Any:
        found.setdefault(id(x), x)
        return x

    map_leaves(obj, visit, is_leaf)
    return list(found.values())


def to_shards(obj: Any) -> Any:
    """``obj`` with every ``DTensor`` replaced by its :class:`TensorShard` (the same DTensor twice: one shard)."""
    from lightning_utils.io.skeleton import format_key_path

    return map_leaves(obj, lambda t, path: to_shard(t, format_key_path(path)), _is_dtensor)


def host_copies(obj: Any) -> Any:
    """``obj`` with every :class:`TensorShard` replaced by a copy whose block lives in fresh host memory."""
    return map_leaves(obj, lambda s, path: s.host_copy(), lambda x: isinstance(x, TensorShard))


@torch.no_grad()
def fill(target: Any, saved: torch.Tensor, source: ShardedCheckpoint | None = None, where: str = "tensor") -> Any:
    """Copy into ``target`` (a ``DTensor`` or a plain tensor) the part of the saved global tensor it holds.

    ``saved`` is either a whole tensor (a slice of it is copied) or a handle from
    :meth:`ShardedCheckpoint.load_lazy <lightning_utils.io.sharded.reader.ShardedCheckpoint.load_lazy>`
    (only the slice is read from ``source``). Returns ``target``. A shape or dtype mismatch
    raises ``ValueError`` naming ``where``.
    """
    if tuple(target.shape) != tuple(saved.shape):
        raise ValueError(
            f"{where}: the checkpoint holds shape {list(saved.shape)}, the model expects {list(target.shape)}"
        )
    offsets, shape = local_block(target, where)
    local = target.to_local() if _is_dtensor(target) else target
    if math.prod(shape) == 0:
        return target
    name = source.handle_name(saved) if source is not None else None
    if name is not None:
        if local.dtype == saved.dtype and local.is_contiguous():
            source.read_block(name, offsets, shape, out=local)  # type: ignore[union-attr]
        else:
            local.copy_(source.read_block(name, offsets, shape))  # type: ignore[union-attr]
        return target
    index = tuple(slice(o, o + s) for o, s in zip(offsets, shape))
    local.copy_(saved[index])
    return target
