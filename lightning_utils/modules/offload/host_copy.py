"""Host copies of a block's inputs: side-stream copies to pinned memory, events, and prefetch.

What it is for: in the forward of an offloaded block each CUDA input is copied to host memory;
in backward it is copied back, and the backward of one block starts the reload of the block
before it, so that the host-to-device copy overlaps computation. How the CUDA path stays correct:

* The device-to-host copy is issued on a side stream that first waits for the compute stream,
  so it reads the finished activation, and it overlaps the rest of the forward.
* ``Tensor.record_stream(side)`` tells the caching allocator that the side stream still reads
  the source, so its memory is not handed out again until the copy has finished, even though
  Python drops the last reference right away.
* An event recorded after the copy is waited on by the stream that reloads it, so the host
  buffer is never read before it is complete.
* The reload runs on the compute stream after that event, unless a prefetch on the side stream
  already brought it back: then the compute stream waits for the prefetch's event.
* Host buffers keep the input's strides, so the recompute sees the forward's memory layout.
* The host buffers are freed by the backward that used them (see :meth:`Group.load`) unless the
  graph is retained, so pinned memory does not stay taken while the caller holds the outputs.

Every stream, event and allocation goes through one object, ``_ops``: the CPU tests substitute a
recording fake for it to check the copy / event / prefetch bookkeeping without a GPU.

What it must never do: read a host buffer before its copy event, let the allocator reuse a
source tensor's memory while a copy still reads it, or hold a strong reference to the source.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import Tensor

from lightning_utils._internals import tensor_version

__all__ = ["Group", "HostCopy", "offloadable", "register"]


class _CudaOps:
    """The device API used for offloading, in one place."""

    device_types: tuple[str, ...] = ("cuda",)

    def __init__(self) -> None:
        self._side: dict[int, Any] = {}

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def side_stream(self, device: torch.device) -> Any:
        """One side stream per device, created on first use."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._side.get(index)
        if stream is None:
            stream = self._side[index] = torch.cuda.Stream(device=index)
        return stream

    def use_stream(self, stream: Any) -> Any:
        return torch.cuda.stream(stream)

    def record_event(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def record_stream(self, t: Tensor, stream: Any) -> None:
        t.record_stream(stream)

    def host_buffer(self, t: Tensor, pin_memory: bool) -> Tensor:
        # empty_like keeps the strides of a dense input (a transposed or channels-last tensor),
        # and .to(device) in the reload keeps them too: the recompute sees the forward's layout
        # and so picks the same kernels.
        return torch.empty_like(t, device="cpu", pin_memory=pin_memory)


_ops = _CudaOps()


def offloadable(t: Tensor) -> bool:
    """Whether ``t`` lives on a device whose tensors are copied to the host."""
    return t.device.type in _ops.device_types


class HostCopy:
    """A device tensor copied to host memory: the buffer, the event that completes the copy and,
    once the backward of the block that follows it has started, a prefetched device copy."""

    __slots__ = ("device", "event", "host", "pinned", "prefetch_event", "prefetched", "source", "version")

    def __init__(self, t: Tensor, pin_memory: bool):
        compute = _ops.current_stream(t.device)
        side = _ops.side_stream(t.device)
        side.wait_stream(compute)  # the copy must read the finished value
        self.pinned = pin_memory
        host = _ops.host_buffer(t, pin_memory)
        with _ops.use_stream(side):
            host.copy_(t, non_blocking=pin_memory)
            self.event = _ops.record_event(side)
        # Not handed to ctx.save_for_backward: saved-tensor hooks (save_on_cpu, an outer
        # non-reentrant checkpoint) would read or swap the buffer while the copy is in flight.
        # The backward drops it instead (see release), like autograd frees saved tensors.
        self.host: Tensor | None = host
        # The caching allocator must not hand t's memory out again until the side stream has
        # finished reading it, although Python may drop the last reference right away.
        _ops.record_stream(t, side)
        self.device = t.device
        self.prefetched: Tensor | None = None
        self.prefetch_event: Any = None
        # A weak reference only: holding the source would keep the device memory we free.
        self.source = weakref.ref(t)
        self.version = tensor_version(t)

    def release(self) -> None:
        """Free the host buffer (and any prefetched copy): the backward that needed it is done."""
        self.host = None
        self.prefetched = None

    def modified(self) -> bool:
        """Whether the source was changed in place after the copy was made."""
        source = self.source()
        return source is not None and tensor_version(source) != self.version

    def prefetch(self) -> None:
        """Start the host-to-device copy on the side stream, to overlap the current backward."""
        host = self.host
        if self.prefetched is not None or not self.pinned or host is None:
            return  # from pageable memory a copy would block the host: load() does it then
        side = _ops.side_stream(self.device)
        side.wait_event(self.event)
        with _ops.use_stream(side):
            self.prefetched = host.to(self.device, non_blocking=True)
            self.prefetch_event = _ops.record_event(side)

    def load(self) -> Tensor:
        """The tensor back on its device, usable on the current stream."""
        host = self.host
        if host is None:
            raise RuntimeError(
                "ActivationOffload: trying to backward through an offloaded block a second time, "
                "but its saved inputs were already freed; specify retain_graph=True in the first "
                "backward if you need to backward twice"
            )
        compute = _ops.current_stream(self.device)
        if self.prefetched is not None:
            t, self.prefetched = self.prefetched, None
            compute.wait_event(self.prefetch_event)
            _ops.record_stream(t, compute)  # allocated on the side stream, used/freed on this one
            return t
        compute.wait_event(self.event)
        return host.to(self.device, non_blocking=self.pinned)


class Group:
    """The host copies of one block call; groups are kept in forward order so that the
    backward of one block can prefetch the inputs of the block before it."""

    __slots__ = ("__weakref__", "copies")

    def __init__(self, copies: list[HostCopy]):
        self.copies = copies

    def load(self, label: str, release: bool) -> dict[int, Tensor]:
        """Every copy back on its device, keyed by ``id(copy)``; then free the host buffers when
        ``release`` (the graph is not retained) and start prefetching the previous group.

        ``label`` names the block in the error raised when a source was changed in place.
        """
        loaded: dict[int, Tensor] = {}
        for host_copy in self.copies:
            if host_copy.modified():
                # Same rule as autograd's saved tensors (and the copy may have raced the change).
                raise RuntimeError(
                    f"ActivationOffload: an input of {label} was modified by an inplace operation "
                    "after the block's forward; offloaded inputs must not be changed in place "
                    "before backward"
                )
            loaded[id(host_copy)] = host_copy.load()
        if release:
            # Without retain_graph autograd frees saved tensors after their backward; do the same
            # with the host copies, or pinned memory stays taken while anyone holds the output.
            for host_copy in self.copies:
                host_copy.release()
        if self.copies:
            previous = _pop_previous(self)
            if previous is not None:  # overlap its host-to-device copy with this block's backward
                for host_copy in previous.copies:
                    host_copy.prefetch()
        return loaded


_order: list[weakref.ref[Group]] = []
_order_lock = threading.Lock()


def register(group: Group) -> None:
    """Append ``group`` to the forward order (a weak reference: a dropped graph frees it)."""
    with _order_lock:
        if len(_order) >= 256:  # groups whose graph was dropped without a backward
            _order[:] = [r for r in _order if r() is not None]
        _order.append(weakref.ref(group))


def _pop_previous(group: Group) -> Group | None:
    """Forget ``group`` (and anything registered after it) and return the group before it."""
    with _order_lock:
        for i in range(len(_order) - 1, -1, -1):
            if _order[i]() is group:
                del _order[i:]
                break
        else:
            return None
        while _order:
            prev = _order[-1]()
            if prev is not None:
                return prev
            _order.pop()
    return None
