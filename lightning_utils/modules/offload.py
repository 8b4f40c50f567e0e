"""Offloaded activation checkpointing: keep only a block's inputs, on the host, and recompute.

``offloaded_checkpoint(fn, *args, **kwargs)`` runs ``fn`` without building its autograd graph,
saves only its tensor arguments (moved to pinned host memory when they live on CUDA) and, in
backward, reloads them onto their original device, replays the CPU/CUDA RNG state and the
autocast state of the forward, re-runs ``fn`` with grad enabled and back-propagates through it.
``apply_activation_offload(module, target)`` makes every matching submodule run that way,
leaving its parameters, buffers and state-dict keys untouched.

Written from torch primitives (``torch.autograd.Function``, CUDA streams and events, pinned
memory); it follows the semantics documented for ``torch.utils.checkpoint`` (RNG and autocast
replay) but shares no code with it or with other projects.

How the CUDA path stays correct:

* The device-to-host copy is issued on a side stream that first waits for the compute stream,
  so it reads the finished activation, and it overlaps the rest of the forward.
* ``Tensor.record_stream(side)`` tells the caching allocator that the side stream still reads
  the source, so its memory is not handed out again until the copy has finished, even though
  Python drops the last reference right away.
* An event recorded after the copy is waited on by the backward stream before the reload, so
  the host buffer is never read before it is complete.

* In backward the block's inputs are reloaded on the compute stream after that event; the
  backward of each block also starts the reload of the previous block's inputs on the side
  stream, so the host-to-device copy overlaps computation.
* The host buffers are not handed to ``save_for_backward`` (saved-tensor hooks such as
  ``save_on_cpu`` or an outer non-reentrant checkpoint would read them while the copy is in
  flight); the backward frees them itself unless the graph is retained (``retain_graph=True``),
  so pinned memory does not stay taken while the caller holds the outputs.
* Host buffers keep the input's strides, so the recompute sees the forward's memory layout.

Also: the recompute restores the running statistics of BatchNorm-style layers afterwards (the
no-grad forward already updated them once), and replays the forward's autocast state for the
CPU, CUDA and the inputs' device types, disabled ones included.

Gradients for the block's parameters are returned by the autograd function itself (the
parameters are passed as its inputs), so ``torch.autograd.grad``, DDP hooks and gradient
accumulation behave as without checkpointing.

Limits: the first forward runs under ``no_grad``, so an op whose kernel choice depends on grad
mode (the eval-mode fast paths of ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer``,
rare SDPA back-end corner cases) may be computed by a different kernel in the recompute;
parameters a block uses must be registered in it or passed to it (checked once, with a clear
error); tensors inside objects other than tuples, lists and dicts are treated as constants;
double backward (``create_graph=True``) is refused. What it must never do: offload parameters or
buffers, change a module's state dict, recompute when nothing needs a gradient, or keep a
reference to a block's intermediate activations.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_utils.modules.targets import Target, find_targets

__all__ = ["apply_activation_offload", "is_offloaded", "offloaded_checkpoint", "remove_activation_offload"]


@dataclass
class OffloadOptions:
    """How one offloaded block saves its inputs."""

    pin_memory: bool = True
    """Copy CUDA inputs into page-locked host memory (needed for truly asynchronous copies)."""
    min_bytes: int = 0
    """Tensor inputs smaller than this stay where they are (saved by reference, not copied)."""
    offload: bool = True
    """False keeps the saved inputs on their device: plain recompute checkpointing."""


# ---------------------------------------------------------------------------------------------
# Nesting guard: a block that runs inside another offloaded block (in its no-grad forward or its
# recompute) runs plainly, so a matching module inside a matching one is never checkpointed twice.
_local = threading.local()


def _depth() -> int:
    return getattr(_local, "depth", 0)


class _Nested:
    def __enter__(self) -> None:
        _local.depth = _depth() + 1

    def __exit__(self, *exc: Any) -> None:
        _local.depth = _depth() - 1


# ---------------------------------------------------------------------------------------------
# Flattening of (args, kwargs) and of outputs into tensor leaves + a structure to rebuild them.
# Handles tuples (named tuples included), lists and dicts; anything else is a constant leaf.
_TENSOR = object()  # placeholder in the structure for "a tensor leaf goes here"


def _flatten(obj: Any, leaves: list[Tensor]) -> Any:
    if isinstance(obj, Tensor):
        leaves.append(obj)
        return _TENSOR
    if isinstance(obj, tuple):
        items = tuple(_flatten(o, leaves) for o in obj)
        return ("tuple", type(obj), items)
    if isinstance(obj, list):
        return ("list", list, [_flatten(o, leaves) for o in obj])
    if isinstance(obj, dict):
        return ("dict", type(obj), [(k, _flatten(v, leaves)) for k, v in obj.items()])
    return ("const", obj)


def _unflatten(spec: Any, leaves: Iterable[Tensor]) -> Any:
    # A plain recursive function over an explicit iterator: a self-referencing closure would form
    # a reference cycle that keeps the leaves (a block's device inputs) alive until gc runs.
    return _build(spec, iter(leaves))


def _build(s: Any, it: Iterator[Tensor]) -> Any:
    if s is _TENSOR:
        return next(it)
    kind = s[0]
    if kind == "const":
        return s[1]
    if kind == "tuple":
        items = [_build(x, it) for x in s[2]]
        cls = s[1]
        if cls is tuple:
            return tuple(items)
        if hasattr(cls, "_fields"):  # named tuple
            return cls(*items)
        return cls(items)
    if kind == "list":
        return [_build(x, it) for x in s[2]]
    if kind == "dict":
        cls = s[1]
        pairs = [(k, _build(v, it)) for k, v in s[2]]
        try:
            return cls(pairs)
        except TypeError:  # dict subclasses with other constructors
            out = cls()
            for k, v in pairs:
                out[k] = v
            return out
    raise AssertionError(f"bad structure {s!r}")


# ---------------------------------------------------------------------------------------------
# The device API used for offloading, in one place (CPU tests substitute a recording fake to
# exercise the copy / event / prefetch bookkeeping without a GPU).
class _CudaOps:
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


class _HostCopy:
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
        self.version = t._version

    def release(self) -> None:
        """Free the host buffer (and any prefetched copy): the backward that needed it is done."""
        self.host = None
        self.prefetched = None

    def modified(self) -> bool:
        source = self.source()
        return source is not None and source._version != self.version

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


def _keep_graph() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True); True when unknown."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


class _Group:
    """The host copies of one block call; groups are kept in forward order so that the
    backward of one block can prefetch the inputs of the block before it."""

    __slots__ = ("__weakref__", "copies")

    def __init__(self, copies: list[_HostCopy]):
        self.copies = copies


_order: list[weakref.ref] = []
_order_lock = threading.Lock()


def _register(group: _Group) -> None:
    with _order_lock:
        if len(_order) >= 256:  # groups whose graph was dropped without a backward
            _order[:] = [r for r in _order if r() is not None]
        _order.append(weakref.ref(group))


def _pop_previous(group: _Group) -> _Group | None:
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


class _Saved:
    """How one tensor input was saved: by reference (index into saved_tensors) or as a host copy."""

    __slots__ = ("copy", "index", "requires_grad")

    def __init__(self, index: int, copy: _HostCopy | None, requires_grad: bool):
        self.index = index
        self.copy = copy
        self.requires_grad = requires_grad


def _devices_of(tensors: Iterable[Tensor], device_type: str) -> list[int]:
    found: list[int] = []
    for t in tensors:
        if t.device.type == device_type:
            idx = t.device.index if t.device.index is not None else 0
            if idx not in found:
                found.append(idx)
    return found


def _autocast_state(tensors: Iterable[Tensor]) -> dict[str, dict[str, Any]]:
    """Autocast on/off, dtype and cache flag of the CPU, CUDA (when present) and the inputs'
    device types. Disabled states are recorded too: a backward called inside an autocast region
    must not recompute a forward that ran outside one in low precision."""
    device_types = {"cpu", *(t.device.type for t in tensors)}
    if torch.cuda.is_available():
        device_types.add("cuda")
    state = {}
    for device_type in sorted(device_types):
        try:
            enabled = torch.is_autocast_enabled(device_type)
            dtype = torch.get_autocast_dtype(device_type)
        except RuntimeError:  # a device type without autocast support
            continue
        state[device_type] = {"enabled": enabled, "dtype": dtype, "cache_enabled": torch.is_autocast_cache_enabled()}
    return state


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: _Run, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        n_inputs = run.n_inputs
        inputs, params = tensors[:n_inputs], tensors[n_inputs:]
        ctx.run = run
        ctx.n_params = len(params)
        ctx.set_materialize_grads(False)

        # RNG and autocast state of this forward, replayed by the recompute.
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_devices = []
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            ctx.cuda_devices = _devices_of((*inputs, *params), "cuda")
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.cuda_devices]
        ctx.autocast = _autocast_state((*inputs, *params))

        # Save the inputs: CUDA tensors of at least min_bytes go to the host, the rest by reference.
        options = run.options
        records: list[_Saved] = []
        by_reference: list[Tensor] = []
        copies: dict[int, _HostCopy] = {}  # the same tensor passed twice is copied once
        for i, t in enumerate(inputs):
            needs_grad = bool(ctx.needs_input_grad[1 + i])
            if (
                options.offload
                and t.device.type in _ops.device_types
                and t.numel() * t.element_size() >= options.min_bytes
                and not isinstance(t, nn.Parameter)
                # a buffer or a view of a parameter/buffer (a rotary cache passed to every
                # block): it stays on the device anyway, so a host copy would only cost time
                and (t.requires_grad or not run.is_module_state(t))
            ):
                host_copy = copies.get(id(t))
                if host_copy is None:
                    host_copy = copies[id(t)] = _HostCopy(t, options.pin_memory)
                records.append(_Saved(-1, host_copy, needs_grad))
            else:
                records.append(_Saved(len(by_reference), None, needs_grad))
                by_reference.append(t)
        ctx.records = records
        ctx.group = _Group(list(copies.values()))
        if copies:
            _register(ctx.group)
        ctx.save_for_backward(*by_reference)

        with _Nested():
            output = run.call(inputs)
        leaves: list[Tensor] = []
        run.out_spec = _flatten(output, leaves)
        non_diff = [t for t in leaves if not (t.is_floating_point() or t.is_complex())]
        if non_diff:
            ctx.mark_non_differentiable(*non_diff)
        ctx.n_outputs = len(leaves)
        return tuple(leaves)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple[Tensor | None, ...]:
        # Backward runs with grad mode on only under create_graph=True. once_differentiable would
        # let that pass with gradients that silently have no graph: refuse it instead.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "ActivationOffload: double backward (create_graph=True, e.g. a gradient penalty) "
                f"through {ctx.run.name or 'an offloaded block'} is not supported; exclude that "
                "module from the target"
            )
        run: _Run = ctx.run
        by_reference = ctx.saved_tensors
        group: _Group = ctx.group
        loaded: dict[int, Tensor] = {}
        for host_copy in group.copies:
            if host_copy.modified():
                # Same rule as autograd's saved tensors (and the copy may have raced the change).
                raise RuntimeError(
                    f"ActivationOffload: an input of {run.name or 'an offloaded block'} was "
                    "modified by an inplace operation after the block's forward; offloaded inputs "
                    "must not be changed in place before backward"
                )
            loaded[id(host_copy)] = host_copy.load()
        if not _keep_graph():
            # Without retain_graph autograd frees saved tensors after their backward; do the same
            # with the host copies, or pinned memory stays taken while anyone holds the output.
            for host_copy in group.copies:
                host_copy.release()
        if group.copies:
            previous = _pop_previous(group)
            if previous is not None:  # overlap its host-to-device copy with this block's backward
                for host_copy in previous.copies:
                    host_copy.prefetch()
        inputs: list[Tensor] = []
        for rec in ctx.records:
            # a fresh leaf per argument position, so each position gets its own gradient
            source = by_reference[rec.index] if rec.copy is None else loaded[id(rec.copy)]
            t = source.detach()
            if rec.requires_grad:
                t.requires_grad_(True)
            inputs.append(t)

        # Replay the forward: same RNG (dropout masks), same autocast, grad enabled. Running
        # statistics are put back only after the gradients: the recomputed graph saved them.
        running_stats = _RunningStats(run.module)
        try:
            with torch.random.fork_rng(devices=ctx.cuda_devices, enabled=True, device_type="cuda"):
                torch.set_rng_state(ctx.cpu_rng)
                for device, state in zip(ctx.cuda_devices, ctx.cuda_rng):
                    torch.cuda.set_rng_state(state, device)
                with torch.enable_grad(), _Nested(), _autocast(ctx.autocast):
                    output = run.call(inputs)
            return _OffloadedCheckpoint._gradients(ctx, run, inputs, output, grad_outputs)
        finally:
            running_stats.restore()

    @staticmethod
    def _gradients(
        ctx: Any, run: _Run, inputs: list[Tensor], output: Any, grad_outputs: tuple[Tensor | None, ...]
    ) -> tuple[Tensor | None, ...]:
        leaves: list[Tensor] = []
        _flatten(output, leaves)
        if len(leaves) != ctx.n_outputs:
            raise RuntimeError(
                f"ActivationOffload: {run.name or 'the block'} returned {len(leaves)} tensors when "
                f"recomputed but {ctx.n_outputs} in the forward; its forward must be deterministic "
                "in structure"
            )

        params = run.params
        wrt: list[Tensor] = [t for t in inputs if t.requires_grad] + [
            p for p, need in zip(params, ctx.needs_input_grad[1 + len(inputs) :]) if need
        ]
        outs, grads = [], []
        for out, g in zip(leaves, grad_outputs):
            if g is not None and out.requires_grad:
                outs.append(out)
                grads.append(g)
        if not run.checked:
            run.check_graph(outs, wrt)
        computed = list(torch.autograd.grad(outs, wrt, grads, allow_unused=True)) if outs and wrt else [None] * len(wrt)

        it = iter(computed)
        result: list[Tensor | None] = [None]  # for `run`
        for t in inputs:
            result.append(next(it) if t.requires_grad else None)
        for need in ctx.needs_input_grad[1 + len(inputs) :]:
            result.append(next(it) if need else None)
        return tuple(result)


class _autocast:
    """Re-enter the autocast state captured in the forward (on or off, for each device type)."""

    def __init__(self, state: dict[str, dict[str, Any]]):
        self.managers = [torch.autocast(device_type=d, **kw) for d, kw in state.items()]

    def __enter__(self) -> None:
        for m in self.managers:
            m.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for m in reversed(self.managers):
            m.__exit__(*exc)


class _RunningStats:
    """A snapshot of the running statistics of the block's normalisation layers (BatchNorm,
    InstanceNorm with ``track_running_stats``), put back after the recompute: the block's no-grad
    forward already updated them once, as the plain forward does, and a second update would
    make the buffers (and the state dict) drift from a run without offloading."""

    def __init__(self, module: nn.Module | None):
        self.saved: list[tuple[Tensor, Tensor]] = []
        if module is None:
            return
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
                for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                    if buf is not None:
                        self.saved.append((buf, buf.clone()))

    def restore(self) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)
        self.saved = []


class _Run:
    """Everything one call needs to run ``fn`` again from its flattened tensor inputs."""

    def __init__(
        self,
        fn: Callable[..., Any],
        in_spec: Any,
        n_inputs: int,
        params: list[Tensor],
        options: OffloadOptions,
        name: str,
        checker: _GraphCheck,
        module: nn.Module | None = None,
        state_of: nn.Module | None = None,
    ):
        self.module = module  # the wrapped module (for its running statistics), if any
        self.state_of = state_of  # the model whose parameters and buffers are never offloaded
        self._state_storages: set[int] | None = None
        self.fn = fn
        self.in_spec = in_spec
        self.n_inputs = n_inputs
        self.params = params
        self.options = options
        self.name = name
        self.out_spec: Any = None
        self._checker = checker

    def is_module_state(self, t: Tensor) -> bool:
        """Whether ``t`` shares storage with a parameter or buffer of the model (or ``params``)."""
        if self._state_storages is None:
            tensors: list[Tensor] = list(self.params)
            if self.state_of is not None:
                tensors += [*self.state_of.parameters(), *self.state_of.buffers()]
            self._state_storages = {x.untyped_storage().data_ptr() for x in tensors}
        return t.untyped_storage().data_ptr() in self._state_storages

    @property
    def checked(self) -> bool:
        return self._checker.done

    def call(self, inputs: Iterable[Tensor]) -> Any:
        args, kwargs = _unflatten(self.in_spec, inputs)
        return self.fn(*args, **kwargs)

    def check_graph(self, outputs: list[Tensor], wrt: list[Tensor]) -> None:
        self._checker.check(outputs, wrt, self.name)


class _GraphCheck:
    """Once per block: make sure every leaf the recomputed graph reaches is one we return a
    gradient for. A parameter used by the block but not registered in it (e.g. captured by a
    closure) would otherwise silently get no gradient."""

    def __init__(self) -> None:
        self.done = False

    def check(self, outputs: list[Tensor], wrt: list[Tensor], name: str) -> None:
        known = {id(t) for t in wrt}
        seen: set[Any] = set()
        stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)
            if variable is not None and id(variable) not in known:
                raise RuntimeError(
                    f"ActivationOffload: {name or 'an offloaded block'} uses a tensor that requires "
                    f"grad (shape {tuple(variable.shape)}) but is neither one of its inputs nor one "
                    "of its registered parameters, so its gradient would be lost. Register it on "
                    "the module, pass it as an argument, or exclude this module from the target."
                )
            stack.extend(fn for fn, _ in node.next_functions)
        self.done = True


def _needs_recompute(leaves: list[Tensor], params: list[Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in leaves) or any(p.requires_grad for p in params)


def offloaded_checkpoint(
    fn: Callable[..., Any],
    *args: Any,
    params: Iterable[Tensor] = (),
    pin_memory: bool = True,
    min_bytes: int = 0,
    offload: bool = True,
    **kwargs: Any,
) -> Any:
    """Call ``fn(*args, **kwargs)`` as an offloaded checkpoint and return its output.

    ``params`` are the tensors ``fn`` uses that are not among its arguments and need gradients
    (for a module: its parameters); their gradients are returned through autograd. Tensors may
    sit anywhere inside tuples, lists and dicts of the arguments and of the output. Without
    grad mode, or when nothing requires grad, ``fn`` simply runs (no checkpoint, no recompute).
    """
    options = OffloadOptions(pin_memory=pin_memory, min_bytes=min_bytes, offload=offload)
    return _checkpoint_call(fn, args, kwargs, list(params), options, "", _GraphCheck())


def _checkpoint_call(
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    params: list[Tensor],
    options: OffloadOptions,
    name: str,
    checker: _GraphCheck,
    module: nn.Module | None = None,
    state_of: nn.Module | None = None,
) -> Any:
    leaves: list[Tensor] = []
    in_spec = _flatten((args, kwargs), leaves)
    if _depth() > 0 or not _needs_recompute(leaves, params):
        return fn(*args, **kwargs)
    params = [p for p in params if p.requires_grad]
    run = _Run(fn, in_spec, len(leaves), params, options, name, checker, module, state_of)
    out_leaves = _OffloadedCheckpoint.apply(run, *leaves, *params)
    return _unflatten(run.out_spec, out_leaves)


# ---------------------------------------------------------------------------------------------
# Module wrapping: an instance-level ``forward`` that routes through the checkpoint.
class _OffloadedForward:
    """Replaces ``module.forward`` on the instance; the class, parameters and keys stay as they
    are. It refers back to the module weakly (a strong reference would make a module <-> wrapper
    cycle, so a deleted model and its device memory would wait for the cyclic garbage
    collector); pickling and deep copies carry the reference over to the new module."""

    def __init__(
        self, module: nn.Module, name: str, options: OffloadOptions, inner: Any, root: nn.Module | None = None
    ):
        self._module = weakref.ref(module)
        # the model it was applied to: its parameters and buffers are never offloaded
        self._root = weakref.ref(root if root is not None else module)
        self.name = name
        self.options = options
        self.inner = inner  # an instance-level forward that was already there, or None
        self.checker = _GraphCheck()

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        params = list(self.module.parameters())
        module = self.module
        root = self._root()
        return _checkpoint_call(
            self._forward,
            args,
            kwargs,
            params,
            self.options,
            self.name,
            self.checker,
            module,
            root if root is not None else module,
        )

    @property
    def module(self) -> nn.Module:
        module = self._module()
        if module is None:
            raise RuntimeError(f"ActivationOffload: the module {self.name!r} this forward belonged to was deleted")
        return module

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_module"] = self.module  # pickle/deepcopy resolve the cycle through their memo
        state["_root"] = None  # never drag the whole model along with one block (see __deepcopy__)
        state["checker"] = _GraphCheck()
        return state

    def __deepcopy__(self, memo: dict) -> _OffloadedForward:
        new = _OffloadedForward.__new__(_OffloadedForward)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        root = self._root()
        if root is not None and id(root) in memo:  # the whole model is being copied
            new._root = weakref.ref(memo[id(root)])
        return new

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        state["_module"] = weakref.ref(state["_module"])
        state["_root"] = weakref.ref(state["_root"] if state["_root"] is not None else state["_module"]())
        self.__dict__.update(state)


def is_offloaded(module: nn.Module) -> bool:
    """True if ``module`` runs as an offloaded checkpoint."""
    return isinstance(module.__dict__.get("forward"), _OffloadedForward)


def apply_activation_offload(
    module: nn.Module,
    target: Target,
    *,
    pin_memory: bool = True,
    min_bytes: int = 0,
    offload: bool = True,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> list[str]:
    """Make every matching submodule of ``module`` (the root included) an offloaded checkpoint.

    Only the outermost match of a nested pair is wrapped; modules already wrapped (and their
    children) are left as they are, so calling this twice is harmless. Returns the qualified
    names of the newly wrapped modules.
    """
    if min_bytes < 0:
        raise ValueError(f"`min_bytes` must be >= 0, got {min_bytes}")
    options = OffloadOptions(pin_memory=pin_memory, min_bytes=int(min_bytes), offload=offload)
    wrapped = []
    for name, sub in list(find_targets(module, target, include, exclude, skip=is_offloaded)):
        inner = sub.__dict__.get("forward")
        sub.forward = _OffloadedForward(sub, name, options, inner, module)  # type: ignore[method-assign]
        wrapped.append(name)
    return wrapped


def remove_activation_offload(module: nn.Module) -> list[str]:
    """Undo ``apply_activation_offload`` on ``module`` and its submodules; returns the names."""
    removed = []
    for name, sub in module.named_modules():
        fwd = sub.__dict__.get("forward")
        if isinstance(fwd, _OffloadedForward):
            if fwd.inner is None:
                del sub.forward
            else:
                sub.forward = fwd.inner  # type: ignore[method-assign]
            removed.append(name)
    return removed
