"""The offloaded checkpoint itself: an autograd function that saves a block's inputs and recomputes it.

What it is for: ``offloaded_checkpoint(fn, *args, **kwargs)`` runs ``fn`` without building its
autograd graph and saves only its tensor arguments: those on CUDA (of at least ``min_bytes``) as
host copies (:mod:`.host_copy`), the rest by reference. In backward it reloads them, replays the
forward's CPU/CUDA RNG state and its autocast state (for the CPU, CUDA and the inputs' device
types, disabled ones included), re-runs ``fn`` with grad enabled and back-propagates through it.
It follows the semantics documented for ``torch.utils.checkpoint`` but is written from torch
primitives (``torch.autograd.Function``, CUDA streams and events, pinned memory).

* Gradients for the block's parameters are returned by the autograd function itself (the
  parameters are passed as its inputs), so ``torch.autograd.grad``, DDP hooks and gradient
  accumulation behave as without checkpointing.
* The recompute puts back the running statistics of BatchNorm-style layers afterwards: the
  no-grad forward already updated them once.
* A block that runs inside another offloaded block (in its no-grad forward or its recompute)
  runs plainly, so a matching module inside a matching one is never checkpointed twice.
* A recompute never writes into a cache a second time: a block handed a mutable cache (a
  Hugging Face ``Cache``) runs without it when it is empty and the block is training, else
  plainly, once (:mod:`.caches`; one warning each).

Limits: the first forward runs under ``no_grad``, so an op whose kernel choice depends on grad
mode (the eval-mode fast paths of ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer``,
rare SDPA back-end corner cases) may be computed by a different kernel in the recompute;
parameters a block uses must be registered in it or passed to it (checked once, with a clear
error); tensors inside objects other than tuples, lists and dicts are treated as constants;
a tensor the block hands out other than through its return value (kept by a forward hook on a
module inside it) comes from the no-grad forward and carries no gradient; double backward
(``create_graph=True``) is refused.

What it must never do: offload parameters or buffers, recompute when nothing needs a gradient,
or keep a reference to a block's intermediate activations.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_utils._internals import autograd_keeps_graph
from lightning_utils.modules.offload.caches import plan, warn_once, without_caches
from lightning_utils.modules.offload.host_copy import Group, HostCopy, offloadable, register
from lightning_utils.modules.offload.pytree import flatten, unflatten

__all__ = ["BlockInfo", "GraphCheck", "OffloadOptions", "checkpoint_call", "offloaded_checkpoint"]


@dataclass
class OffloadOptions:
    """How one offloaded block saves its inputs."""

    pin_memory: bool = True
    """Copy CUDA inputs into page-locked host memory (needed for truly asynchronous copies)."""
    min_bytes: int = 0
    """Tensor inputs smaller than this stay where they are (saved by reference, not copied)."""
    offload: bool = True
    """False keeps the saved inputs on their device: plain recompute checkpointing."""


class GraphCheck:
    """Once per block: make sure every leaf the recomputed graph reaches is one we return a
    gradient for. A parameter used by the block but not registered in it (e.g. captured by a
    closure) would otherwise silently get no gradient."""

    def __init__(self) -> None:
        self.done = False

    def check(self, outputs: list[Tensor], wrt: list[Tensor], name: str) -> None:
        known = {id(t) for t in wrt}
        seen: set[Any] = set()
        stack: list[torch.autograd.graph.Node | None] = [o.grad_fn for o in outputs if o.grad_fn is not None]
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


@dataclass
class BlockInfo:
    """What a checkpoint call knows about the block it runs, besides the call itself."""

    options: OffloadOptions = field(default_factory=OffloadOptions)
    name: str = ""
    """The block's qualified name, for error messages."""
    checker: GraphCheck = field(default_factory=GraphCheck)
    """The block's once-only check of its recomputed graph."""
    module: nn.Module | None = None
    """The wrapped module, whose running statistics the recompute must not update again."""
    state_of: nn.Module | None = None
    """The model whose parameters and buffers are never offloaded, even when passed as inputs."""
    warned: set[str] = field(default_factory=set)
    """The cache warnings already given for this set of blocks (each is given once)."""


# ---------------------------------------------------------------------------------------------
# Nesting guard: a checkpoint call inside another one's no-grad forward or recompute runs plainly.
_local = threading.local()


def _depth() -> int:
    return getattr(_local, "depth", 0)


class _Nested:
    def __enter__(self) -> None:
        _local.depth = _depth() + 1

    def __exit__(self, *exc: Any) -> None:
        _local.depth = _depth() - 1


# ---------------------------------------------------------------------------------------------
# The forward's RNG and autocast state, replayed by the recompute.
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


class _ForwardState:
    """The CPU/CUDA RNG state and the autocast state at the start of a block's forward."""

    def __init__(self, tensors: tuple[Tensor, ...]):
        self.cpu_rng = torch.get_rng_state()
        self.cuda_devices: list[int] = []
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda_devices = _devices_of(tensors, "cuda")
        self.cuda_rng = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]
        self.autocast = _autocast_state(tensors)

    @contextlib.contextmanager
    def rng(self) -> Iterator[None]:
        """The forward's RNG state inside, the caller's again afterwards."""
        with torch.random.fork_rng(devices=self.cuda_devices, enabled=True, device_type="cuda"):
            torch.set_rng_state(self.cpu_rng)
            for device, state in zip(self.cuda_devices, self.cuda_rng):
                torch.cuda.set_rng_state(state, device)
            yield

    @contextlib.contextmanager
    def autocast_state(self) -> Iterator[None]:
        """The forward's autocast state (on or off, for each device type) inside."""
        with contextlib.ExitStack() as stack:
            for device_type, kwargs in self.autocast.items():
                stack.enter_context(torch.autocast(device_type=device_type, **kwargs))
            yield


class _RunningStats:
    """A snapshot of the running statistics of the block's normalisation layers (BatchNorm,
    InstanceNorm with ``track_running_stats``), put back after the recompute: the block's no-grad
    forward already updated them once, as the plain forward does, and a second update would
    make the buffers (and the state dict) drift from a run without offloading.

    Any layer in training mode with a true ``track_running_stats`` attribute counts, whatever
    its class: its ``running_mean``, ``running_var`` and ``num_batches_tracked`` tensors are saved.
    """

    _BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, module: nn.Module | None):
        self.saved: list[tuple[Tensor, Tensor]] = []
        if module is None:
            return
        for m in module.modules():
            if m.training and getattr(m, "track_running_stats", False) is True:
                for name in self._BUFFERS:
                    buf = getattr(m, name, None)
                    if isinstance(buf, Tensor):
                        self.saved.append((buf, buf.clone()))

    def restore(self) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)
        self.saved = []


# ---------------------------------------------------------------------------------------------
# One call, and how its inputs are saved.
class _Run:
    """Everything one call needs to run ``fn`` again from its flattened tensor inputs."""

    def __init__(self, fn: Callable[..., Any], in_spec: Any, n_inputs: int, params: list[Tensor], block: BlockInfo):
        self.fn = fn
        self.in_spec = in_spec
        self.n_inputs = n_inputs
        self.params = params
        self.block = block
        self.out_spec: Any = None
        self._state_storages: set[int] | None = None

    @property
    def name(self) -> str:
        return self.block.name

    def is_module_state(self, t: Tensor) -> bool:
        """Whether ``t`` shares storage with a parameter or buffer of the model (or ``params``)."""
        if self._state_storages is None:
            tensors: list[Tensor] = list(self.params)
            state_of = self.block.state_of
            if state_of is not None:
                tensors += [*state_of.parameters(), *state_of.buffers()]
            self._state_storages = {x.untyped_storage().data_ptr() for x in tensors}
        return t.untyped_storage().data_ptr() in self._state_storages

    def offloads(self, t: Tensor) -> bool:
        """Whether the input ``t`` is saved as a host copy (else by reference)."""
        options = self.block.options
        return (
            options.offload
            and offloadable(t)
            and t.numel() * t.element_size() >= options.min_bytes
            and not isinstance(t, nn.Parameter)
            # a buffer or a view of a parameter/buffer (a rotary cache passed to every
            # block): it stays on the device anyway, so a host copy would only cost time
            and (t.requires_grad or not self.is_module_state(t))
        )

    def call(self, inputs: Iterable[Tensor]) -> Any:
        args, kwargs = unflatten(self.in_spec, inputs)
        return self.fn(*args, **kwargs)


class _Saved:
    """How one tensor input was saved: by reference (index into saved_tensors) or as a host copy."""

    __slots__ = ("copy", "index", "requires_grad")

    def __init__(self, index: int, copy: HostCopy | None, requires_grad: bool):
        self.index = index
        self.copy = copy
        self.requires_grad = requires_grad


def _save_inputs(
    run: _Run, inputs: tuple[Tensor, ...], needs_grad: tuple[bool, ...]
) -> tuple[list[_Saved], Group, list[Tensor]]:
    """How each input is saved, the group of host copies made, and the inputs kept by reference."""
    records: list[_Saved] = []
    by_reference: list[Tensor] = []
    copies: dict[int, HostCopy] = {}  # the same tensor passed twice is copied once
    for t, needs in zip(inputs, needs_grad):
        if run.offloads(t):
            host_copy = copies.get(id(t))
            if host_copy is None:
                host_copy = copies[id(t)] = HostCopy(t, run.block.options.pin_memory)
            records.append(_Saved(-1, host_copy, bool(needs)))
        else:
            records.append(_Saved(len(by_reference), None, bool(needs)))
            by_reference.append(t)
    return records, Group(list(copies.values())), by_reference


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: _Run, *tensors: Tensor) -> tuple[Tensor, ...]:
        inputs, params = tensors[: run.n_inputs], tensors[run.n_inputs :]
        ctx.run = run
        ctx.set_materialize_grads(False)
        ctx.state = _ForwardState((*inputs, *params))

        # CUDA tensors of at least min_bytes go to the host, the rest is saved by reference.
        ctx.records, ctx.group, by_reference = _save_inputs(run, inputs, ctx.needs_input_grad[1 : 1 + len(inputs)])
        if ctx.group.copies:
            register(ctx.group)
        ctx.save_for_backward(*by_reference)

        with _Nested():
            output = run.call(inputs)
        run.out_spec, leaves = flatten(output)
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
        inputs = _reloaded_inputs(ctx, run)

        # Replay the forward: same RNG (dropout masks), same autocast, grad enabled. Running
        # statistics are put back only after the gradients: the recomputed graph saved them.
        state: _ForwardState = ctx.state
        running_stats = _RunningStats(run.block.module)
        try:
            with state.rng():
                with torch.enable_grad(), _Nested(), state.autocast_state():
                    output = run.call(inputs)
                return _gradients(ctx, run, inputs, output, grad_outputs)
        finally:
            running_stats.restore()


def _reloaded_inputs(ctx: Any, run: _Run) -> list[Tensor]:
    """The block's inputs for the recompute: a fresh leaf per argument position (so each
    position gets its own gradient), from the reloaded host copies or the saved references."""
    by_reference = ctx.saved_tensors
    group: Group = ctx.group
    loaded = group.load(run.name or "an offloaded block", release=not autograd_keeps_graph())
    inputs: list[Tensor] = []
    for rec in ctx.records:
        source = by_reference[rec.index] if rec.copy is None else loaded[id(rec.copy)]
        t = source.detach()
        if rec.requires_grad:
            t.requires_grad_(True)
        inputs.append(t)
    return inputs


def _gradients(
    ctx: Any, run: _Run, inputs: list[Tensor], output: Any, grad_outputs: tuple[Tensor | None, ...]
) -> tuple[Tensor | None, ...]:
    """The gradients of the recomputed ``output`` for the autograd function's inputs."""
    _, leaves = flatten(output)
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
    checker = run.block.checker
    if not checker.done:
        checker.check(outs, wrt, run.name)
    computed = list(torch.autograd.grad(outs, wrt, grads, allow_unused=True)) if outs and wrt else [None] * len(wrt)

    it = iter(computed)
    result: list[Tensor | None] = [None]  # for `run`
    for t in inputs:
        result.append(next(it) if t.requires_grad else None)
    for need in ctx.needs_input_grad[1 + len(inputs) :]:
        result.append(next(it) if need else None)
    return tuple(result)


# ---------------------------------------------------------------------------------------------
def _needs_recompute(leaves: list[Tensor], params: list[Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in leaves) or any(p.requires_grad for p in params)


def checkpoint_call(
    fn: Callable[..., Any], args: tuple, kwargs: dict, params: Iterable[Tensor], block: BlockInfo
) -> Any:
    """``fn(*args, **kwargs)`` as an offloaded checkpoint of ``block``, whose parameters are
    ``params``; a plain call without grad mode, when nothing requires grad, or inside another
    checkpoint call."""
    params = list(params)
    in_spec, leaves = flatten((args, kwargs))
    if _depth() > 0 or not _needs_recompute(leaves, params):
        return fn(*args, **kwargs)
    # A cache the block writes into must not be written again by the recompute.
    decision = plan(args, kwargs, block.module, block.name)
    warn_once(decision, block.warned)
    if decision.action == "plain":
        return fn(*args, **kwargs)
    if decision.action == "drop":
        args, kwargs = without_caches((args, kwargs))
        in_spec, leaves = flatten((args, kwargs))
    params = [p for p in params if p.requires_grad]
    run = _Run(fn, in_spec, len(leaves), params, block)
    out_leaves = _OffloadedCheckpoint.apply(run, *leaves, *params)
    return unflatten(run.out_spec, out_leaves)


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
    return checkpoint_call(fn, args, kwargs, params, BlockInfo(options, warned=_FUNCTION_WARNED))


_FUNCTION_WARNED: set[str] = set()
"""The cache warnings given for calls of ``offloaded_checkpoint`` (once per process)."""
