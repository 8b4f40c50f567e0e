"""Gather a state dict, sharded or not, to rank 0 one tensor at a time.

Exporting the weights of a model trained with FSDP2 (``fully_shard``, Lightning's
``ModelParallelStrategy``), FSDP1's sharded state dict, tensor or pipeline parallelism means
assembling each parameter from the pieces the ranks hold. Gathering the full state dict at once
(``StateDictOptions(full_state_dict=True)``, FSDP's ``FULL_STATE_DICT``) needs the whole model in
rank 0's memory. :class:`RankZeroGather` instead hands rank 0 one assembled tensor at a time, in
the order rank 0 chooses, so a streaming writer can write and free it before the next one:

1. :meth:`RankZeroGather.plan` (collective): every rank describes what it holds (name, global
   shape, dtype, and for each local piece its offsets in the global tensor); rank 0 checks that
   the ranks agree, picks one holder for every piece (replicas are sent once), lets the caller
   choose which tensors to export under which names and dtypes, and sends the plan to all ranks.
2. :meth:`RankZeroGather.stream` (collective): for each planned tensor, rank 0 allocates the
   full tensor in its export dtype, copies its own pieces in, and receives the others' pieces
   straight into their place (``send``/``recv``); it then hands the tensor to the caller's sink
   and drops it. Pieces that are not contiguous in the full tensor (a ``Shard(1)`` from tensor
   parallelism) travel in slices of at most :data:`PIECE_BYTES`.

Extra memory: rank 0 holds one full tensor (in the export dtype) plus, for non-contiguous pieces,
one slice of at most :data:`PIECE_BYTES`; every other rank at most a copy of its own piece, made
only when the export dtype or the communication device differs. :class:`MemoryTracker` accounts
every buffer this module allocates, and frees it when the tensor object dies.

Which values it assembles: plain tensors (taken from the lowest rank holding them, rank 0 when it
does), ``DTensor`` with ``Shard``/``Replicate`` placements on any mesh (FSDP2, HSDP, tensor
parallel), and objects with ``local_shards()``/``metadata()`` (FSDP1's ``ShardedTensor``). A
``DTensor`` with any other placement (``Partial``, strided sharding) is assembled with
``DTensor.full_tensor()`` by the ranks of its mesh, one tensor at a time as well.

Failures: a failure on any rank (a full disk on rank 0, a bad value on another rank) is recorded,
the ranks agree before each tensor whether to go on, and then every rank raises: the rank that
failed its own exception, the others :class:`OtherRankError` (of the same family:
``OSError``, ``ValueError`` or ``RuntimeError``) carrying its message. No rank is left waiting.

This module never imports Lightning, never creates or destroys a process group, never gathers
more than one tensor at a time, and never writes files (the sink does).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist

from lightning_utils.io.weights import TensorSpec

__all__ = [
    "PIECE_BYTES",
    "Chunk",
    "MemoryTracker",
    "OtherRankError",
    "OtherRankOSError",
    "OtherRankValueError",
    "PlanEntry",
    "RankZeroGather",
    "TensorInfo",
]

PIECE_BYTES = 16 << 20  # largest slice of a non-contiguous piece sent or staged at once
T = TypeVar("T")


# -- failures ----------------------------------------------------------------------------------
class OtherRankError(RuntimeError):
    """The export failed on another rank; the message is that rank's error."""

    def __init__(self, rank: int, message: str) -> None:
        self.rank = rank
        super().__init__(f"rank {rank}: {message}")


class OtherRankOSError(OtherRankError, OSError):
    """An ``OSError`` on another rank (a full disk, a missing folder on rank 0)."""


class OtherRankValueError(OtherRankError, ValueError):
    """A ``ValueError`` on another rank (bad input: metadata, names, a model the ranks disagree on)."""


def _family(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return "OSError"
    if isinstance(exc, ValueError):
        return "ValueError"
    return "RuntimeError"


def _raise_remote(rank: int, family: str, message: str) -> None:
    cls = {"OSError": OtherRankOSError, "ValueError": OtherRankValueError}.get(family, OtherRankError)
    raise cls(rank, message)


class _Outcome:
    """The first failure on this rank, kept until the ranks compare notes."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every failure is re-raised after the ranks agree
            if self.error is None:
                self.error = exc

    def record(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc


# -- memory accounting -------------------------------------------------------------------------
class MemoryTracker:
    """Bytes of the buffers the gather allocated that are still alive, and their peak, per device type.

    Each buffer is counted from :meth:`track` until its tensor object is freed (a
    ``weakref.finalize``), so a buffer kept alive by mistake (a list that grows, a cache) shows up
    in :attr:`peak`.
    """

    def __init__(self) -> None:
        self.current: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self.largest_tensor_bytes = 0  # the largest tensor of the plan, in its export dtype
        self.tensors = 0

    @property
    def peak_bytes(self) -> int:
        """The peak over device types (each device type is counted separately)."""
        return max(self.peak.values(), default=0)

    def track(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        device = t.device.type
        self.current[device] += nbytes
        self.peak[device] = max(self.peak[device], self.current[device])
        weakref.finalize(t, self._free, device, nbytes)
        return t

    def _free(self, device: str, nbytes: int) -> None:
        self.current[device] -= nbytes


# -- what a rank holds -------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """A box of a global tensor: ``offsets`` and ``sizes`` per dimension."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))


@dataclass(frozen=True)
class TensorInfo:
    """The global shape and dtype of a tensor some rank holds."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Described:
    """What one rank says about one of its values (sent to rank 0)."""

    name: str
    kind: str  # "plain", "dtensor", "sharded" or "error"
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None
    chunks: tuple[Chunk, ...] | None = None  # None: only DTensor.full_tensor() can assemble it
    error: str = ""


@dataclass(frozen=True)
class Source:
    """One piece of a planned tensor: which rank sends which of its local pieces, and where it goes."""

    rank: int
    index: int
    chunk: Chunk


@dataclass(frozen=True)
class PlanEntry:
    """One tensor to assemble on rank 0: its local name, what to write, and where its pieces are.

    ``sources`` is empty for a tensor assembled with ``DTensor.full_tensor()`` by ``holders``,
    and for an empty tensor (no holders either).
    """

    name: str
    out: TensorSpec
    sources: tuple[Source, ...] = ()
    holders: tuple[int, ...] = ()

    @property
    def collective(self) -> bool:
        return bool(self.holders)


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def _dtensor_chunk(value: Any) -> Chunk | None:
    """The box of the global tensor this rank's local tensor holds, for ``Shard``/``Replicate``
    placements (``torch.chunk`` semantics, mesh dimensions in order); ``None`` for any other
    placement, or when the local tensor does not have the computed shape."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = value.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    shape = tuple(value.shape)
    offsets, sizes = [0] * len(shape), list(shape)
    for mesh_dim, placement in enumerate(value.placements):
        if type(placement) is Replicate:
            continue
        if type(placement) is not Shard:  # Partial, _StridedShard and anything newer
            return None
        dim = placement.dim % len(shape) if shape else 0
        parts, index = mesh.size(mesh_dim), coordinate[mesh_dim]
        step = -(-sizes[dim] // parts) if sizes[dim] else 0
        start = min(index * step, sizes[dim])
        size = max(0, min(sizes[dim], start + step) - start)
        offsets[dim] += start
        sizes[dim] = size
    if tuple(value.to_local().shape) != tuple(sizes):
        return None
    return Chunk(tuple(offsets), tuple(sizes))


def _is_sharded_tensor(value: Any) -> bool:
    return callable(getattr(value, "local_shards", None)) and callable(getattr(value, "metadata", None))


def _describe(name: str, value: Any, dtensor: Any) -> _Described | None:
    """This rank's description of ``value``; ``None`` for a value that is not a tensor or that this
    rank holds no part of (a DTensor on a mesh without this rank)."""
    try:
        if dtensor is not None and isinstance(value, dtensor):
            if value.device_mesh.get_coordinate() is None:
                return None
            chunk = _dtensor_chunk(value)
            return _Described(name, "dtensor", tuple(value.shape), value.dtype, None if chunk is None else (chunk,))
        if _is_sharded_tensor(value):
            shards = value.local_shards()
            chunks = tuple(
                Chunk(tuple(int(o) for o in s.metadata.shard_offsets), tuple(int(n) for n in s.metadata.shard_sizes))
                for s in shards
            )
            meta = value.metadata()
            return _Described(name, "sharded", tuple(int(n) for n in meta.size), meta.tensor_properties.dtype, chunks)
        if isinstance(value, torch.Tensor):
            shape = tuple(value.shape)
            return _Described(name, "plain", shape, value.dtype, (Chunk((0,) * len(shape), shape),))
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails every rank with it
        return _Described(name, "error", error=f"tensor {name!r}: {type(exc).__name__}: {exc}")
    return None


def _local_piece(value: Any, index: int) -> torch.Tensor:
    """This rank's ``index``-th local piece of ``value``."""
    if _is_sharded_tensor(value):
        return value.local_shards()[index].tensor
    to_local = getattr(value, "to_local", None)
    if callable(to_local):
        return to_local()
    return value


def _tiles(shape: tuple[int, ...], chunks: Sequence[Chunk]) -> bool:
    """Whether the (distinct, non-empty) chunks lie inside ``shape`` and cover it exactly once."""
    for c in chunks:
        if len(c.offsets) != len(shape) or any(o < 0 or o + s > n for o, s, n in zip(c.offsets, c.sizes, shape)):
            return False
    if sum(c.numel for c in chunks) != math.prod(shape):
        return False
    if len(chunks) <= 256:
        for i, a in enumerate(chunks):
            for b in chunks[i + 1 :]:
                if all(
                    ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes)
                ):
                    return False
    return True


# -- the gather --------------------------------------------------------------------------------
@dataclass
class _Group:
    rank: int = 0
    world: int = 1
    group: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _communication_device(group: Any) -> torch.device:
    """Where tensors must live to travel through ``group``: the CPU when its backend has gloo,
    otherwise the current accelerator (NCCL and its kin take device tensors only)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


class RankZeroGather(Generic[T]):
    """Assemble the tensors of ``items`` (this rank's ``(name, value)`` pairs) on rank 0, one at a time.

    Call :meth:`plan` and then :meth:`stream` on **every** rank of ``group`` (default: the
    default process group; without one, or with one rank, nothing is communicated).
    """

    def __init__(
        self, items: Sequence[tuple[str, Any]], group: Any = None, tracker: MemoryTracker | None = None
    ) -> None:
        self._values = dict(items)
        self.tracker = tracker if tracker is not None else MemoryTracker()
        self._g = _Group()
        if dist.is_available() and dist.is_initialized():
            self._g = _Group(dist.get_rank(group), dist.get_world_size(group), group)
            if self._g.distributed:
                self._g.device = _communication_device(group)
        self._dtensor = _dtensor_type()

    @property
    def rank(self) -> int:
        return self._g.rank

    @property
    def is_rank_zero(self) -> bool:
        return self._g.rank == 0

    # -- collectives -----------------------------------------------------------------------------
    def _global(self, rank: int) -> int:
        return rank if self._g.group is None else dist.get_global_rank(self._g.group, rank)

    def _gather_to_zero(self, obj: Any) -> list[Any] | None:
        if not self._g.distributed:
            return [obj]
        out: list[Any] | None = [None] * self._g.world if self.is_rank_zero else None
        dist.gather_object(obj, out, dst=self._global(0), group=self._g.group)
        return out

    def _broadcast_from_zero(self, obj: Any) -> Any:
        if not self._g.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self._global(0), group=self._g.group)
        return box[0]

    def _any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (every rank learns the answer)."""
        if not self._g.distributed:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self._g.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._g.group)
        return bool(t.item())

    # -- plan ------------------------------------------------------------------------------------
    def plan(
        self, choose: Callable[[dict[str, TensorInfo]], tuple[list[tuple[str, TensorSpec]], T]]
    ) -> tuple[list[PlanEntry], T | None]:
        """Agree on what to assemble (collective).

        ``choose`` runs on rank 0 only, with every tensor some rank holds (name -> global shape
        and dtype, rank 0's names first, in its order); it returns the tensors to export, in the
        order :meth:`stream` will deliver them, as ``(name, TensorSpec(out_name, dtype, shape))``
        (the shape must be the tensor's), and a value of its own that rank 0 gets back. Any
        error (in ``choose``, or ranks that disagree about a tensor) is raised on every rank.
        """
        described = [
            d for d in (_describe(name, value, self._dtensor) for name, value in self._values.items()) if d is not None
        ]
        everything = self._gather_to_zero(described)
        reply: tuple[str, Any] | None = None
        extra: T | None = None
        error: Exception | None = None
        if everything is not None:
            try:
                available, holdings = self._merge(everything)
                chosen, extra = choose(available)
                reply = ("ok", self._entries(chosen, available, holdings))
            except Exception as exc:  # noqa: BLE001 - raised on every rank below
                reply = ("error", (_family(exc), f"{type(exc).__name__}: {exc}"))
                error = exc
        status, payload = self._broadcast_from_zero(reply)
        if status == "error":
            if error is not None:
                raise error
            _raise_remote(0, *payload)
        return payload, extra

    def _merge(
        self, everything: list[list[_Described]]
    ) -> tuple[dict[str, TensorInfo], dict[str, list[tuple[int, _Described]]]]:
        holdings: dict[str, list[tuple[int, _Described]]] = {}
        for rank, described in enumerate(everything):
            for d in described:
                if d.kind == "error":
                    raise ValueError(f"rank {rank}: {d.error}")
                holdings.setdefault(d.name, []).append((rank, d))
        available: dict[str, TensorInfo] = {}
        for name, held in holdings.items():
            first_rank, first = held[0]
            for rank, d in held[1:]:
                if d.kind != first.kind or d.shape != first.shape or d.dtype != first.dtype:
                    raise ValueError(
                        f"tensor {name!r}: rank {first_rank} holds a {first.kind} {first.dtype} {first.shape}, "
                        f"rank {rank} a {d.kind} {d.dtype} {d.shape}; the ranks must agree on the model"
                    )
            assert first.dtype is not None
            available[name] = TensorInfo(first.shape, first.dtype)
        return available, holdings

    def _entries(
        self,
        chosen: list[tuple[str, TensorSpec]],
        available: Mapping[str, TensorInfo],
        holdings: Mapping[str, list[tuple[int, _Described]]],
    ) -> list[PlanEntry]:
        entries: list[PlanEntry] = []
        outs: set[str] = set()
        for name, out in chosen:
            if name not in available:
                raise KeyError(f"tensor {name!r} is held by no rank")
            if out.shape != available[name].shape:
                raise ValueError(f"tensor {name!r}: export shape {out.shape} differs from {available[name].shape}")
            if out.name in outs:
                raise ValueError(f"two tensors would be exported as {out.name!r}")
            outs.add(out.name)
            held = holdings[name]
            kind = held[0][1].kind
            if math.prod(out.shape) == 0:  # nothing to fetch: rank 0 makes the empty tensor
                entries.append(PlanEntry(name, out))
                continue
            if kind == "plain":
                rank, _ = held[0]  # the lowest rank holding it (rank 0 when it does)
                entries.append(PlanEntry(name, out, (Source(rank, 0, Chunk((0,) * len(out.shape), out.shape)),)))
                continue
            if any(d.chunks is None for _, d in held):
                if kind != "dtensor":
                    raise ValueError(f"tensor {name!r}: its shards cannot be placed in the full tensor")
                entries.append(PlanEntry(name, out, holders=tuple(rank for rank, _ in held)))
                continue
            sources: dict[Chunk, Source] = {}
            for rank, d in held:
                assert d.chunks is not None
                for index, chunk in enumerate(d.chunks):
                    if chunk.numel and chunk not in sources:
                        sources[chunk] = Source(rank, index, chunk)
            if not _tiles(out.shape, list(sources)):
                if kind != "dtensor":
                    raise ValueError(f"tensor {name!r}: its shards do not cover the tensor {out.shape} exactly once")
                entries.append(PlanEntry(name, out, holders=tuple(rank for rank, _ in held)))
                continue
            entries.append(PlanEntry(name, out, tuple(sources.values())))
        return entries

    # -- stream ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def outcome(self) -> Iterator[_Outcome]:
        """A scope whose failures, on any rank, are raised on every rank when it ends.

        Work inside that can fail on one rank only is run under ``outcome.capture()``; an
        exception that escapes the block (a broken connection) propagates as it is.
        """
        outcome = _Outcome()
        yield outcome
        mine = None
        if outcome.error is not None:
            mine = (_family(outcome.error), f"{type(outcome.error).__name__}: {outcome.error}")
        if self._g.distributed:
            everyone: list[Any] = [None] * self._g.world
            dist.all_gather_object(everyone, mine, group=self._g.group)
        else:
            everyone = [mine]
        if outcome.error is not None:
            raise outcome.error
        for rank, failure in enumerate(everyone):
            if failure is not None:
                _raise_remote(rank, *failure)

    def stream(
        self,
        entries: Sequence[PlanEntry],
        sink: Callable[[PlanEntry, torch.Tensor], None] | None,
        outcome: _Outcome,
    ) -> None:
        """Assemble ``entries`` in order (collective) and hand each full CPU tensor to ``sink`` on rank 0.

        ``sink`` failures (and failures preparing a piece on any rank) are recorded in
        ``outcome``; the ranks then stop together before the next tensor that needs more than
        rank 0.
        """
        for entry in entries:
            self.tracker.largest_tensor_bytes = max(self.tracker.largest_tensor_bytes, entry.out.nbytes)
        for entry in entries:
            # A tensor rank 0 has whole needs no other rank (DDP, replicated buffers): the ranks
            # only agree before the tensors they take part in, and the final exchange of
            # outcomes covers the rest.
            local = not entry.collective and all(s.rank == 0 for s in entry.sources)
            if local and not self.is_rank_zero:
                continue
            full: torch.Tensor | None = None
            sends: list[tuple[Source, torch.Tensor]] = []
            with outcome.capture():
                if self.is_rank_zero and sink is None:
                    raise RuntimeError("the export output could not be opened")
                full, sends = self._prepare(entry)
            if local:
                if outcome.failed:
                    continue
            elif self._any(outcome.failed):
                return
            full = self._assemble_collective(entry, full) if entry.collective else self._assemble(entry, full, sends)
            del sends
            if self.is_rank_zero:
                assert full is not None
                assert sink is not None
                if full.device.type != "cpu":
                    full = self.tracker.track(full.to("cpu"))
                with outcome.capture():
                    sink(entry, full)
                self.tracker.tensors += 1
            del full

    def _cast(self, t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        out = t.detach().to(device=device, dtype=dtype).contiguous()
        if out.device != t.device or (out.numel() and out.data_ptr() != t.data_ptr()):
            self.tracker.track(out)  # a copy was made
        return out

    def _prepare(self, entry: PlanEntry) -> tuple[torch.Tensor | None, list[tuple[Source, torch.Tensor]]]:
        """Allocate what this rank needs for ``entry`` before the ranks agree to go on: rank 0's
        full tensor, the others' send buffers. Nothing here communicates."""
        out = entry.out
        device = self._g.device
        if not entry.sources and not entry.holders:  # an empty tensor
            return (torch.empty(out.shape, dtype=out.dtype) if self.is_rank_zero else None), []
        if entry.collective:
            if self.is_rank_zero and 0 not in entry.holders:
                return self.tracker.track(torch.empty(out.shape, dtype=out.dtype, device=device)), []
            return None, []
        if self.is_rank_zero:
            only = entry.sources[0] if len(entry.sources) == 1 else None
            if only is not None and only.rank == 0:  # rank 0 holds all of it: no copy unless a cast is due
                piece = _local_piece(self._values[entry.name], only.index)
                return self._cast(piece, out.dtype, piece.device if piece.device.type == "cpu" else device), []
            return self.tracker.track(torch.empty(out.shape, dtype=out.dtype, device=device)), []
        sends = []
        for source in entry.sources:
            if source.rank == self.rank:
                piece = _local_piece(self._values[entry.name], source.index)
                sends.append((source, self._cast(piece, out.dtype, device)))
        return None, sends

    def _assemble(
        self, entry: PlanEntry, full: torch.Tensor | None, sends: list[tuple[Source, torch.Tensor]]
    ) -> torch.Tensor | None:
        if not self.is_rank_zero:
            for source, buffer in sends:
                self._send_piece(buffer, source.chunk, full_shape=entry.out.shape)
            return None
        assert full is not None
        if not entry.sources or (len(entry.sources) == 1 and entry.sources[0].rank == 0):
            return full  # already the whole tensor (or an empty one)
        for source in entry.sources:
            region = full[source.chunk.slices()]
            if source.rank == 0:
                region.copy_(_local_piece(self._values[entry.name], source.index))
            else:
                self._recv_piece(region, source, entry.out.shape)
        return full

    @staticmethod
    def _slices(sizes: tuple[int, ...], itemsize: int) -> list[tuple[int, int]]:
        """Row ranges (along dim 0) in which a piece whose place in the full tensor is not
        contiguous travels: at most PIECE_BYTES each, and at least one row."""
        row_bytes = max(1, math.prod(sizes[1:]) * itemsize)
        per = max(1, PIECE_BYTES // row_bytes)
        return [(r, min(sizes[0], r + per)) for r in range(0, sizes[0], per)]

    def _send_piece(self, buffer: torch.Tensor, chunk: Chunk, full_shape: tuple[int, ...]) -> None:
        dst = self._global(0)
        if _region_is_contiguous(full_shape, chunk):
            dist.send(buffer, dst=dst, group=self._g.group)
            return
        for start, stop in self._slices(chunk.sizes, buffer.element_size()):
            dist.send(buffer[start:stop], dst=dst, group=self._g.group)  # a row range of a contiguous buffer

    def _recv_piece(self, region: torch.Tensor, source: Source, full_shape: tuple[int, ...]) -> None:
        src = self._global(source.rank)
        if _region_is_contiguous(full_shape, source.chunk):
            dist.recv(region, src=src, group=self._g.group)
            return
        for start, stop in self._slices(source.chunk.sizes, region.element_size()):
            target = region[start:stop]
            staging = self.tracker.track(torch.empty(target.shape, dtype=region.dtype, device=region.device))
            dist.recv(staging, src=src, group=self._g.group)
            target.copy_(staging)
            del staging

    def _assemble_collective(self, entry: PlanEntry, full: torch.Tensor | None) -> torch.Tensor | None:
        """``DTensor.full_tensor()`` on the ranks of its mesh; the lowest of them sends it to rank 0
        when rank 0 is not one of them."""
        holder = min(entry.holders)
        mine: torch.Tensor | None = None
        if self.rank in entry.holders:
            value = self._values[entry.name]
            mine = self.tracker.track(value.full_tensor())
            mine = self._cast(mine, entry.out.dtype, mine.device)
        if self.is_rank_zero:
            if mine is not None:
                return mine
            assert full is not None
            dist.recv(full, src=self._global(holder), group=self._g.group)
            return full
        if self.rank == holder and 0 not in entry.holders:
            assert mine is not None
            dist.send(mine.to(self._g.device).contiguous(), dst=self._global(0), group=self._g.group)
        return None


def _region_is_contiguous(shape: tuple[int, ...], chunk: Chunk) -> bool:
    """Whether ``chunk``'s box is one contiguous run of a contiguous tensor of ``shape`` (computed
    the same way on the sending and the receiving rank)."""
    return bool(torch.empty(shape, device="meta")[chunk.slices()].is_contiguous())
