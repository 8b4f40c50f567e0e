"""Making submodules run as offloaded checkpoints: apply, remove, and ask.

What it is for: ``apply_activation_offload(module, target)`` puts an instance-level ``forward``
on every matching submodule that routes the call through :func:`.function.checkpoint_call`, with
the submodule's parameters as the checkpoint's parameters and the model it was applied to as the
owner of the tensors never to offload. ``remove_activation_offload`` takes those forwards off
again, ``is_offloaded`` tells whether a module has one. ``compile_offloaded`` makes an offloaded
module run its own forward compiled inside the checkpoint (its call, which reaches the
checkpoint machinery, is never compiled: a module compiled in place is refused).

What it must never do: change a module's class, parameters, buffers or state-dict keys, wrap a
module (or anything inside it) twice, or make a module and its wrapper reference each other
strongly (a deleted model would then wait for the cyclic garbage collector).
"""

from __future__ import annotations

import copy
import sys
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_utils._internals import is_compiled_in_place
from lightning_utils.modules.offload.function import BlockInfo, GraphCheck, OffloadOptions, checkpoint_call
from lightning_utils.modules.targets import Target, find_targets

__all__ = [
    "apply_activation_offload",
    "compile_offloaded",
    "is_offload_compiled",
    "is_offloaded",
    "remove_activation_offload",
]


class _OffloadedForward:
    """Replaces ``module.forward`` on the instance; the class, parameters and keys stay as they
    are. It refers back to the module weakly (a strong reference would make a module <-> wrapper
    cycle, so a deleted model and its device memory would wait for the cyclic garbage
    collector); pickling and deep copies carry the reference over to the new module."""

    def __init__(
        self,
        module: nn.Module,
        name: str,
        options: OffloadOptions,
        inner: Any,
        root: nn.Module | None = None,
        warned: set[str] | None = None,
    ):
        self._module = weakref.ref(module)
        # the model it was applied to: its parameters and buffers are never offloaded
        self._root = weakref.ref(root if root is not None else module)
        self.name = name
        self.options = options
        self.inner = inner  # an instance-level forward that was already there, or None
        self.checker = GraphCheck()
        # the cache warnings given so far, shared by the blocks of one apply call (each once)
        self.warned = warned if warned is not None else set()
        self.compile_kwargs: dict[str, Any] | None = None
        """``torch.compile`` options when the block's forward runs compiled (see compile_offloaded)."""
        self._compiled: Any = None  # the compiled forward, made at the first call

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        fn = self.inner if self.inner is not None else type(module).forward
        if self.compile_kwargs is not None:
            if self._compiled is None:
                # The block's own forward function is compiled: its code object keys the
                # compiler's cache, so each block class gets its own entries (as with
                # module.compile()) and blocks of one class share them.
                self._compiled = torch.compile(fn, **self.compile_kwargs)
            fn = self._compiled
        return fn(*args, **kwargs) if self.inner is not None else fn(module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # Traced by a compiled caller (a compiled parent module): the checkpoint machinery
            # (RNG and autocast capture, host copies, an autograd Function over flattened
            # arguments) is not traceable, so it runs eagerly in one piece instead of breaking
            # the caller's graph at every step of it. The block's own forward still runs
            # compiled when compile_offloaded asked for it.
            return _eager_checkpoint()(self, args, kwargs)
        return self._checkpoint(args, kwargs)

    def _checkpoint(self, args: tuple, kwargs: dict) -> Any:
        module = self.module
        _check_no_inner_units(module, self.name)  # every call: fully_shard may come after apply
        root = self._root()
        block = BlockInfo(
            self.options, self.name, self.checker, module, root if root is not None else module, self.warned
        )
        return checkpoint_call(self._forward, args, kwargs, module.parameters(), block)

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
        state["checker"] = GraphCheck()
        state["_compiled"] = None  # made again from compile_kwargs at the first call
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
        # pickles written before the cache warnings and compiled forwards existed
        state.setdefault("warned", set())
        state.setdefault("compile_kwargs", None)
        state.setdefault("_compiled", None)
        self.__dict__.update(state)


_EAGER: dict[str, Any] = {}


def _eager_checkpoint() -> Any:
    """``_OffloadedForward._checkpoint`` behind ``torch.compiler.disable``, made when first needed
    (the decorator imports the compiler stack, which a module import must not pay for)."""
    fn = _EAGER.get("checkpoint")
    if fn is None:
        fn = _EAGER["checkpoint"] = torch.compiler.disable(_OffloadedForward._checkpoint)
    return fn


def _check_no_inner_units(module: nn.Module, name: str) -> None:
    """Refuse a block with FSDP2 (``fully_shard``) units inside it.

    Such a unit gathers its parameters into tensors of its own for each forward, which the
    checkpoint does not know as the block's parameters: their gradients would be lost (the
    recompute's graph check refuses them too, less clearly). A block that is itself a unit, or
    lies inside one, is fine: its gathered parameters are registered on it while it runs.
    """
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if not isinstance(fsdp_module, type):
        return  # FSDP2 is not even imported
    units = [n for n, m in module.named_modules() if n and isinstance(m, fsdp_module)]
    if units:
        label = name or type(module).__name__
        raise RuntimeError(
            f"ActivationOffload: {label} contains fully_shard units ({', '.join(units[:4])}"
            f"{', ...' if len(units) > 4 else ''}); an offloaded block must be a whole FSDP2 unit or "
            "lie inside one. Shard the block itself (fully_shard(block)) rather than modules "
            "inside it, or offload those inner modules instead"
        )


def is_offloaded(module: nn.Module) -> bool:
    """True if ``module`` runs as an offloaded checkpoint."""
    return isinstance(module.__dict__.get("forward"), _OffloadedForward)


def is_offload_compiled(module: nn.Module) -> bool:
    """True if ``module`` runs as an offloaded checkpoint of its compiled forward."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, _OffloadedForward) and forward.compile_kwargs is not None


def compile_offloaded(module: nn.Module, **compile_kwargs: Any) -> None:
    """Make the offloaded ``module`` run its forward compiled (``torch.compile(**compile_kwargs)``)
    inside the checkpoint, in the forward and in the recompute.

    ``module.compile()`` would compile the module's call, which reaches the checkpoint machinery
    (not traceable); this compiles only what the checkpoint runs. Module hooks (an FSDP2 unit's
    all-gather and reduce-scatter) stay outside the checkpoint and run eagerly.
    """
    forward = module.__dict__.get("forward")
    if not isinstance(forward, _OffloadedForward):
        raise ValueError(f"compile_offloaded: {type(module).__name__} is not offloaded; use module.compile()")
    forward.compile_kwargs = dict(compile_kwargs)
    forward._compiled = None


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
    warned: set[str] = set()
    targets = list(find_targets(module, target, include, exclude, skip=is_offloaded))
    for name, sub in targets:  # all checked before any is wrapped
        if is_compiled_in_place(sub):
            # its compiled call would trace the checkpoint machinery (graph breaks, every step)
            raise RuntimeError(
                f"ActivationOffload: {name or '<root>'} ({type(sub).__name__}) is already compiled in "
                "place (module.compile() or CompileModules ran first); offload it before compiling "
                "it: list ActivationOffload before CompileModules, which then compiles the block's "
                "forward inside the checkpoint"
            )
    for name, sub in targets:
        inner = sub.__dict__.get("forward")
        sub.forward = _OffloadedForward(sub, name, options, inner, module, warned)
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
                sub.forward = fwd.inner
            if fwd.compile_kwargs is not None:  # it stays compiled, now in place
                sub.compile(**fwd.compile_kwargs)
            removed.append(name)
    return removed
