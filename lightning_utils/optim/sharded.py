"""Geometry and collectives for APOLLO on DTensor parameters (FSDP2, HSDP, tensor parallelism).

What it is for: :class:`~lightning_utils.optim.Apollo` updates a DTensor parameter on its local
block of rows and columns. This module says which block a rank holds of the ``(m, n)`` matrix a
parameter is treated as (:class:`ShardLayout`), builds the optimizer-state tensors that follow
the parameter's placements (:func:`state_dtensor`), and runs the few collectives the update
needs, each batched over a param group: a reduce-scatter of low-rank projected gradients
(:func:`reduce_scatter_rows`) and all-reduces of per-channel or per-tensor sums of squares
(:class:`SumReducer`).

Supported placements, per mesh dimension: ``Replicate()``, ``Shard(0)`` (FSDP2's rows) and, for
2-D parameters, ``Shard(1)`` (row-wise tensor parallelism's columns); at most one mesh dimension
may shard each of the two matrix dimensions. Everything else (``Partial``, ``_StridedShard``,
``Shard(d)`` on a dimension folded into the columns of a >2-D parameter) is refused with an error
naming the parameter and its placements.

What it must never do: all-gather a weight or a full gradient (only projected gradients, of
``r`` rows, and vectors/scalars of norms cross ranks), issue a collective on some ranks and not
others (every decision here depends only on global shapes, placements and the param-group
order, which every rank shares), or use a private DTensor API: the local block is computed from
the public ``DeviceMesh``/``Shard`` description with ``torch.chunk``'s rule, which is how
DTensor lays out shards, and checked against ``to_local()``'s shape.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "ShardLayout",
    "SumReducer",
    "chunk_bounds",
    "is_dtensor",
    "local",
    "reduce_scatter_rows",
    "shard_like",
    "state_dtensor",
]


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``.

    Without importing that module (about a second, which a one-process run never pays): no
    tensor can be a DTensor before something else has imported it.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor: Any) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def chunk_bounds(size: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` when ``size`` is split into ``parts`` as ``torch.chunk``
    (and DTensor's ``Shard``) split it: chunks of ``ceil(size / parts)``, the last ones shorter
    or empty."""
    full = -(-size // parts)
    start = min(size, full * index)
    return start, min(size, start + full)


class ShardLayout:
    """Where a rank's local block sits in the ``(m, n)`` matrix of a DTensor parameter.

    ``row_dim``/``col_dim`` are the mesh dimensions sharding the rows/columns (``None`` when no
    mesh dimension of size > 1 does); ``rows``/``cols`` are the local block's bounds;
    ``axes[mesh_dim]`` is ``(process group, group size, this rank's index)`` of each of them
    (looked up once: ``DeviceMesh.get_group`` is not free).
    """

    __slots__ = ("axes", "col_dim", "cols", "mesh", "placements", "row_dim", "rows")

    def __init__(self, param: Any, m: int, n: int, name: str) -> None:
        from torch.distributed.tensor import Replicate, Shard

        mesh, placements = param.device_mesh, tuple(param.placements)
        self.mesh, self.placements = mesh, placements
        where = f"parameter {name} {tuple(param.shape)} with placements {placements}"
        coordinate = mesh.get_coordinate()
        if coordinate is None:
            raise ValueError(f"{where}: this rank is not part of its device mesh {mesh}")
        self.row_dim: int | None = None
        self.col_dim: int | None = None
        self.rows, self.cols = (0, m), (0, n)
        self.axes: dict[int, tuple[Any, int, int]] = {}
        for mesh_dim, placement in enumerate(placements):
            if isinstance(placement, Replicate):
                continue
            if not isinstance(placement, Shard):
                raise ValueError(
                    f"{where}: {placement!r} on mesh dimension {mesh_dim} is not supported for the "
                    "low-rank update; supported per mesh dimension are Replicate(), Shard(0) and, for 2-D "
                    "parameters, Shard(1) (put this parameter in an AdamW group with rank=0 otherwise)"
                )
            dim = placement.dim % param.dim()
            if dim > 1 or (dim == 1 and param.dim() > 2):
                raise ValueError(
                    f"{where}: Shard({placement.dim}) on mesh dimension {mesh_dim} splits a dimension "
                    f"that the matrix view (shape[0], prod(shape[1:])) = ({m}, {n}) folds into its columns; "
                    "only Shard(0), and Shard(1) of a 2-D parameter, are supported (use rank=0 for it otherwise)"
                )
            if (self.row_dim if dim == 0 else self.col_dim) is not None:
                raise ValueError(
                    f"{where}: dimension {dim} is sharded by two mesh dimensions; one mesh dimension "
                    "per matrix dimension is supported (use rank=0 for this parameter otherwise)"
                )
            parts = mesh.size(mesh_dim)
            if dim == 0:
                self.rows = chunk_bounds(m, parts, coordinate[mesh_dim])
                self.row_dim = mesh_dim if parts > 1 else None
            else:
                self.cols = chunk_bounds(n, parts, coordinate[mesh_dim])
                self.col_dim = mesh_dim if parts > 1 else None
            if parts > 1:
                self.axes[mesh_dim] = (mesh.get_group(mesh_dim), parts, coordinate[mesh_dim])
        local_rows = param.to_local().shape[0] if param.dim() else 0
        if local_rows != self.rows[1] - self.rows[0] or (
            param.dim() == 2 and param.to_local().shape[1] != self.cols[1] - self.cols[0]
        ):
            raise ValueError(
                f"{where}: the local shard has shape {tuple(param.to_local().shape)}, not the block "
                f"rows {self.rows} x columns {self.cols} that torch.chunk's rule gives; this layout is not supported"
            )

    @property
    def sharded(self) -> bool:
        """Whether any mesh dimension of size > 1 splits the matrix."""
        return self.row_dim is not None or self.col_dim is not None

    @property
    def shape(self) -> tuple[int, int]:
        """The local block's shape."""
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]


def state_dtensor(local_tensor: torch.Tensor, layout: ShardLayout, shape: Sequence[int]) -> Any:
    """Wrap a local state block as a DTensor of global ``shape`` with the parameter's mesh and
    placements (no communication): what a checkpoint loader reslices when the world size changes."""
    from torch.distributed.tensor import DTensor

    global_shape = torch.Size(shape)
    stride = tuple(math.prod(global_shape[i + 1 :]) for i in range(len(global_shape)))
    return DTensor.from_local(
        local_tensor, layout.mesh, layout.placements, run_check=False, shape=global_shape, stride=stride
    )


def shard_like(value: torch.Tensor, param: Any) -> Any:
    """This rank's block of an unsharded state tensor, as a DTensor with ``param``'s mesh and
    placements (sliced locally: every rank holds the same ``value``, nothing is sent). The block
    is a copy, so the whole ``value`` is not kept alive by it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    sliced = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    return DTensor.from_local(
        sliced.to_local().clone(),
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=sliced.shape,
        stride=sliced.stride(),
    )


def reduce_scatter_rows(tensors: list[torch.Tensor], axis: tuple[Any, int, int]) -> list[torch.Tensor]:
    """Sum each 2-D tensor over the ranks of a mesh dimension (``axis``: its process group, size
    and this rank's index there) and keep this rank's chunk of its rows (``torch.chunk``'s rule),
    with one reduce-scatter for all of them.

    Rows are padded to a multiple of the group size, so uneven (and empty) chunks work.
    """
    group, parts, index = axis
    chunks = [-(-t.shape[0] // parts) for t in tensors]
    widths = [c * t.shape[1] for c, t in zip(chunks, tensors)]
    send = torch.zeros((parts, sum(widths)), dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for tensor, chunk, width in zip(tensors, chunks, widths):
        if chunk:
            rows = torch.nn.functional.pad(tensor, (0, 0, 0, parts * chunk - tensor.shape[0]))
            send[:, offset : offset + width].copy_(rows.view(parts, width))
        offset += width
    received = torch.empty(sum(widths), dtype=send.dtype, device=send.device)
    single = getattr(dist, "reduce_scatter_single", None)  # torch >= 2.13 deprecates reduce_scatter_tensor
    if single is not None:
        single(received, send.view(-1), group=group)
    else:
        dist.reduce_scatter_tensor(received, send.view(-1), group=group)
    out, offset = [], 0
    for tensor, chunk, width in zip(tensors, chunks, widths):
        start, stop = chunk_bounds(tensor.shape[0], parts, index)
        out.append(received[offset : offset + width].view(chunk, tensor.shape[1])[: stop - start])
        offset += width
    return out


class SumReducer:
    """Batches the sums of squares that one round of a step must add across ranks.

    ``add`` queues a tensor under the process groups (of mesh dimensions) it is a partial sum
    over; ``flush`` runs one ``all_reduce`` per group and queue (the queues in the order they
    were first used, the same on every rank) and writes the totals back into the queued tensors.
    """

    def __init__(self) -> None:
        self._queues: dict[tuple[Any, ...], list[torch.Tensor]] = {}

    def add(self, tensor: torch.Tensor, groups: tuple[Any, ...]) -> None:
        if groups:
            self._queues.setdefault(groups, []).append(tensor)

    def flush(self) -> None:
        for groups, tensors in self._queues.items():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            for group in groups:
                dist.all_reduce(flat, group=group)
            offset = 0
            for tensor in tensors:
                tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()
        self._queues.clear()
