"""Swap submodules for replacements, carrying the weights over and keeping state-dict keys.

``replace_modules(root, target, replacement, ...)`` finds matching submodules (see
``lightning_utils.modules.targets``) and puts ``replacement`` in their place in every parent that
holds them. ``replacement`` is either

* a class: built from the old module's constructor-named attributes (``in_features``,
  ``embedding_dim``, ``eps``...; ``bias`` means "the old one had a bias", ``dtype`` is the old
  weights' dtype), or by ``cls.from_module(old)`` when the class defines it; or
* a factory ``(qualified_name, old) -> new``.

With ``copy_weights`` the old parameters and buffers are carried over under the same keys:
a parameter of the same shape, dtype and class is moved over as the very same ``Parameter``
object (so weight tying and ``requires_grad`` survive, at no copy cost); anything else is copied
with ``load_state_dict``, and a parameter shared by several replaced modules (tied weights) is
shared again by their replacements. A key of the old module that the new one lacks is an error, never a
silent drop. A factory that converts weights itself says so with a ``copies_weights = True``
attribute (the presets in ``lightning_utils.modules.presets`` do), and is then left alone.

It must never operate on a DDP-wrapped model, replace a module it produced itself, or replace a
module already wrapped by ``ActivationOffload``, compiled in place or sharded (``fully_shard``,
DTensor parameters): it refuses, saying to replace first.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_utils._internals import is_compiled_in_place
from lightning_utils.modules.targets import Target, find_targets

Factory = Callable[[str, nn.Module], nn.Module]
Replacement = type | Factory

__all__ = ["Replacement", "build_like", "check_not_transformed", "copy_module_state", "replace_modules"]

_MISSING = object()
_ALIASES = {"input_features": "in_features", "output_features": "out_features"}


def _first_tensor(module: nn.Module) -> torch.Tensor | None:
    for p in module.parameters():
        return p
    for b in module.buffers():
        return b
    return None


def _floating_dtype(module: nn.Module) -> torch.dtype | None:
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    return None


def _value_for(old: nn.Module, name: str) -> Any:
    if name == "bias":
        bias = getattr(old, "bias", _MISSING)
        if bias is None or isinstance(bias, torch.Tensor):
            return bias is not None
        return _MISSING
    if name == "dtype":
        dtype = _floating_dtype(old)
        return _MISSING if dtype is None else dtype
    if name == "device":
        return _MISSING  # built on the CPU, moved after the weights are in (see replace_modules)
    value = getattr(old, _ALIASES.get(name, name), _MISSING)
    if isinstance(value, (nn.Module, torch.Tensor)) or callable(value):
        return _MISSING
    return value


def build_like(cls: type[nn.Module], old: nn.Module) -> nn.Module:
    """Construct ``cls`` with the hyper-parameters of ``old`` (no weights copied here)."""
    from_module = getattr(cls, "from_module", None)
    if callable(from_module):
        return from_module(old)
    kwargs = {}
    for pname, p in list(inspect.signature(cls.__init__).parameters.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = _value_for(old, pname)
        if value is not _MISSING:
            kwargs[pname] = value
        elif p.default is p.empty:
            raise TypeError(
                f"replacement: cannot build {cls.__name__} from {type(old).__name__}: its "
                f"constructor needs {pname!r}, which {type(old).__name__} has no attribute for; "
                "pass a factory (name, old) -> new instead, or give the class a from_module(old)"
            )
    return cls(**kwargs)


def _owner(root: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, leaf = key.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def copy_module_state(
    old: nn.Module,
    new: nn.Module,
    name: str = "",
    converted: dict[int, tuple[nn.Parameter, nn.Parameter]] | None = None,
) -> None:
    """Carry ``old``'s parameters and buffers into ``new`` under the same keys (see module doc).

    ``converted`` maps ``id(old_parameter)`` to ``(old_parameter, its_new_parameter)`` for the
    parameters that had to be copied into new objects (another dtype or Parameter class); it is
    filled here and consulted so that a parameter shared by several replaced modules (tied
    embedding and output weights) ends up as one shared new parameter, not several copies.
    """
    converted = {} if converted is None else converted
    old_sd = old.state_dict(keep_vars=True)
    new_sd = new.state_dict(keep_vars=True)
    label = f"{name!r} ({type(old).__name__} -> {type(new).__name__})"
    missing = [k for k in old_sd if k not in new_sd]
    if missing:
        raise ValueError(
            f"ReplaceModules: cannot copy the weights of {label}: the replacement has no "
            f"{missing}. Pass copy_weights=False, or a factory that converts them itself"
        )
    rest = {}
    ties: list[tuple[str, str]] = []  # (key, earlier key of the same old Parameter in `rest`)
    first_key: dict[int, str] = {}
    for key, value in old_sd.items():
        target = new_sd[key]
        if target is value:
            continue
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"ReplaceModules: cannot copy {key!r} of {label}: shape {tuple(value.shape)} "
                f"vs {tuple(target.shape)} in the replacement"
            )
        if type(value) is nn.Parameter and type(target) is nn.Parameter and value.dtype == target.dtype:
            owner, leaf = _owner(new, key)
            setattr(owner, leaf, value)  # the same Parameter: ties and requires_grad survive
            continue
        if isinstance(value, nn.Parameter):
            prior = converted.get(id(value))
            if prior is not None and _interchangeable(prior[1], target):
                owner, leaf = _owner(new, key)
                setattr(owner, leaf, prior[1])  # tied to a parameter converted earlier
                continue
            if id(value) in first_key:
                ties.append((key, first_key[id(value)]))
                continue
            first_key[id(value)] = key
        rest[key] = value.detach()
        if isinstance(target, nn.Parameter) and isinstance(value, nn.Parameter):
            target.requires_grad_(value.requires_grad and target.is_floating_point())
    if rest:
        result = new.load_state_dict(rest, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"ReplaceModules: {label} did not accept {result.unexpected_keys}")
    loaded = new.state_dict(keep_vars=True)
    for key, earlier in ties:
        owner, leaf = _owner(new, key)
        if _interchangeable(loaded[earlier], new_sd[key]):
            setattr(owner, leaf, loaded[earlier])
    for key, value in old_sd.items():
        if key in first_key.values() and isinstance(loaded.get(key), nn.Parameter):
            converted[id(value)] = (value, loaded[key])


def _interchangeable(a: torch.Tensor, b: torch.Tensor) -> bool:
    return type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and a.device == b.device


def check_not_transformed(name: str, old: nn.Module) -> None:
    """Refuse a module wrapped by ActivationOffload or compiled in place (see below)."""
    # An instance-level offload wrapper or compiled call belongs to the old object: a fresh
    # replacement would silently lose it, and a re-classed copy (from_module) would keep calling
    # the old module's forward through it.
    from lightning_utils.modules.offload import is_offloaded

    by = "ActivationOffload" if is_offloaded(old) else None
    if is_compiled_in_place(old):
        by = "CompileModules (Module.compile)"
    sharded = _sharded_by(old)
    if sharded is not None:
        # The sharding state (FSDP2's parameter groups, the optimizer built on them) holds the
        # old module's DTensor parameters: a replacement would train parameters nothing shards
        # or reduces, and the old ones would keep being gathered.
        raise ValueError(
            f"ReplaceModules: {name or type(old).__name__!r} is already sharded ({sharded}); "
            "replace modules before sharding them: build the layers in the LightningModule's "
            "__init__ (the callback's setup runs before configure_model, where fully_shard runs), "
            "or call ReplaceModules(...).apply(layer) in configure_model before fully_shard"
        )
    if by is not None:
        raise ValueError(
            f"ReplaceModules: {name or type(old).__name__!r} was already transformed by {by}; "
            "replace modules before wrapping or compiling them: put ReplaceModules before "
            "ActivationOffload / CompileModules in the Trainer's callbacks (or call its apply() first)"
        )


def _sharded_by(module: nn.Module) -> str | None:
    """How ``module`` is sharded already (an FSDP2 unit, DTensor parameters), or ``None``.

    Checked through ``sys.modules``: neither class can be in use unless its module is imported."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    if isinstance(fsdp_module, type) and isinstance(module, fsdp_module):
        return "a fully_shard unit"
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if isinstance(dtensor, type) and any(isinstance(p, dtensor) for p in module.parameters()):
        return "its parameters are DTensors"
    return None


def _set_everywhere(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` in every place under ``root`` that holds ``old`` (a shared module has several)."""
    names = [name for name, module in root.named_modules(remove_duplicate=False) if module is old and name]
    for name in names:
        owner, leaf = _owner(root, name)
        setattr(owner, leaf, new)


def replace_modules(
    root: nn.Module,
    target: Target,
    replacement: Replacement,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    copy_weights: bool = True,
    produced: weakref.WeakSet[nn.Module] | None = None,
    allow_root: bool = True,
) -> tuple[nn.Module, dict[str, nn.Module]]:
    """Replace matching submodules of ``root``; returns ``(root_or_its_replacement, {name: new})``.

    ``produced`` collects the new modules and is consulted so they are never replaced again
    (repeated ``setup`` calls). Only the outermost match of a nested pair is replaced.
    """
    if not (isinstance(replacement, type) or callable(replacement)):
        raise TypeError(
            f"`replacement` must be an nn.Module class or a factory (name, old) -> new, got "
            f"{type(replacement).__name__}"
        )
    if isinstance(replacement, type) and not issubclass(replacement, nn.Module):
        raise TypeError(f"`replacement` class {replacement.__name__} is not an nn.Module")
    produced = weakref.WeakSet() if produced is None else produced

    def already_done(module: nn.Module) -> bool:
        return module in produced or (isinstance(replacement, type) and type(module) is replacement)

    targets = list(find_targets(root, target, include, exclude, skip=already_done))
    if not copy_weights:
        return _replace_all(root, targets, replacement, copy_weights, produced, allow_root)
    # The replacements' fresh initialisation is overwritten by the copied weights; it must not
    # advance the global RNG either, or every later random draw (dropout masks, data order)
    # would differ from the same seeded run without the replacement.
    with torch.random.fork_rng(devices=[]):
        return _replace_all(root, targets, replacement, copy_weights, produced, allow_root)


def _replace_all(
    root: nn.Module,
    targets: list[tuple[str, nn.Module]],
    replacement: Replacement,
    copy_weights: bool,
    produced: weakref.WeakSet[nn.Module],
    allow_root: bool,
) -> tuple[nn.Module, dict[str, nn.Module]]:
    done: dict[str, nn.Module] = {}
    converted: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    new_root = root
    for name, old in targets:
        check_not_transformed(name, old)
        if not name and not allow_root:
            raise ValueError(
                f"`target` matches the root module itself ({type(root).__name__}); "
                "ReplaceModules can only replace submodules"
            )
        if isinstance(replacement, type):
            new = build_like(replacement, old)
            handles_weights = getattr(replacement, "from_module", None) is not None and getattr(
                replacement, "copies_weights", False
            )
        else:
            new = replacement(name, old)
            if not isinstance(new, nn.Module):
                raise TypeError(f"`replacement` factory returned {type(new).__name__} for {name!r}, not an nn.Module")
            handles_weights = bool(getattr(replacement, "copies_weights", False))
        if copy_weights and not handles_weights and new is not old:
            copy_module_state(old, new, name, converted)
        # Any tensor of the replacement on another device, not just its first: carried-over
        # parameters are already on the old device, its own extra buffers/parameters were built
        # on the CPU.
        ref = _first_tensor(old)
        if (
            ref is not None
            and ref.device.type != "meta"
            and any(t.device != ref.device for t in (*new.parameters(), *new.buffers()))
        ):
            new = new.to(ref.device)
        new.train(old.training)
        produced.add(new)
        if name:
            _set_everywhere(root, old, new)
        else:
            new_root = new
        done[name] = new
    return new_root, done
