"""Every private Lightning and torch name this package relies on, in one place, each with a reason.

What it is for: a private name (``_FitLoop``, ``trainer._logger_connector``, ``GradScaler._scale``)
can change in any release of Lightning or torch without notice. Each one the package uses is
listed in :data:`PRIVATE_NAMES` with what uses it, why no public API does the job, and which
public alternative was checked. The code that touches a Lightning-private name lives here too,
as a small named function, so that a Lightning upgrade is checked in this one file;
``tests/test_internals.py`` fails with a clear message when a listed name disappears from the
installed Lightning or torch.

What it must never do: import ``lightning`` at import time (the torch-only layer imports this
module); every Lightning access goes through ``sys.modules`` or a lazy import inside a function.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

__all__ = ["PRIVATE_NAMES", "PrivateName", "missing_private_names"]


@dataclass(frozen=True)
class PrivateName:
    """One private name the package uses.

    ``module`` and ``attribute`` locate it: ``attribute`` is a dotted path from the module
    (``"_FitLoop"``, ``"GradScaler._scale"``). A name that exists only on instances (set in
    ``__init__``) is written ``"Class.<instance>.name"`` and is checked by reading the class's
    source. ``used_by`` names our module, ``why`` says what it is needed for, and ``public`` which
    public API was checked and why it does not do the job.
    """

    module: str
    attribute: str
    used_by: str
    why: str
    public: str


# -- data: ResumableDataLoader finding the Lightning loop and fetcher that iterate it ------------
_DATA: tuple[PrivateName, ...] = ()

# -- io and plugins: checkpoint loading and Lightning's CheckpointIO wrappers -------------------
_IO: tuple[PrivateName, ...] = (
    PrivateName(
        module="lightning.pytorch.core.saving",
        attribute="_load_state",
        used_by="lightning_utils.plugins.module_loading (through load_module_state below)",
        why="builds the LightningModule from a checkpoint dict already in memory: hparams with "
        "the given overrides, on_load_checkpoint, load_state_dict with strict",
        public="LightningModule.load_from_checkpoint does the same but only from a path or file "
        "object, which it reads with torch.load, so it cannot read a .sft file; handing it a "
        ".sft's contents would mean re-pickling the whole checkpoint in memory",
    ),
    PrivateName(
        module="lightning.pytorch.plugins.io.wrapper",
        attribute="_WrappingCheckpointIO.<instance>._checkpoint_io",
        used_by="lightning_utils.plugins.checkpoint_io (through replace_wrapped_checkpoint_io below)",
        why="ensure_safetensors_checkpoint_io swaps the TorchCheckpointIO inside a wrapper plugin "
        "(other than Lightning's own AsyncCheckpointIO, which is replaced whole) for a "
        "SafetensorsCheckpointIO",
        public="the wrapper's public checkpoint_io setter sets a base only while none is set, and "
        "the strategy's checkpoint_io getter has always set a TorchCheckpointIO by then, so the "
        "setter silently keeps it; a wrapper is found by its public checkpoint_io property (duck "
        "typing), not by the private base class",
    ),
    PrivateName(
        module="lightning.pytorch.strategies.fsdp",
        attribute="FSDPStrategy.<instance>._state_dict_type",
        used_by="lightning_utils.plugins.module_loading (through fsdp_state_dict_type below)",
        why="names FSDP's state_dict_type in the error that refuses .sft under FSDP (sharded "
        "checkpoints also bypass the plugin when saving)",
        public="FSDPStrategy takes state_dict_type as a constructor argument and exposes no property for it",
    ),
    PrivateName(
        module="torch",
        attribute="Tensor._neg_view",
        used_by="lightning_utils.io.skeleton, lightning_utils.plugins.checkpoint_io",
        why="a lazily negated view (the negative bit, e.g. c.conj().imag) is stored as its raw "
        "memory plus the bit, and rebuilt as a negated view, so values and memory sharing come "
        "back as torch.load gives them",
        public="Tensor.neg() and Tensor.resolve_neg() materialise a copy that no longer shares "
        "memory with its base; no public API sets the negative bit on a view",
    ),
    PrivateName(
        module="torch",
        attribute="TypedStorage.<instance>._untyped_storage",
        used_by="lightning_utils.io.map_location",
        why="a map_location callable may return a TypedStorage; the tensor is rebuilt on its bytes",
        public="TypedStorage.untyped() returns the same storage but emits TypedStorage's deprecation warning",
    ),
)


def load_module_state(cls: type, checkpoint: dict[str, Any], strict: bool | None, **kwargs: Any) -> Any:
    """Lightning's own construction of ``cls`` (a ``LightningModule``) from a loaded checkpoint dict."""
    from lightning.pytorch.core.saving import _load_state

    return _load_state(cls, checkpoint, strict=strict, **kwargs)


def replace_wrapped_checkpoint_io(wrapper: Any, checkpoint_io: Any) -> None:
    """Make the CheckpointIO ``wrapper`` delegate to ``checkpoint_io`` instead of its current base."""
    wrapper._checkpoint_io = checkpoint_io


def fsdp_state_dict_type(strategy: Any) -> str | None:
    """The ``state_dict_type`` an ``FSDPStrategy`` was built with (``"full"`` or ``"sharded"``)."""
    return getattr(strategy, "_state_dict_type", None)


# -- modules and module callbacks --------------------------------------------------------------
_MODULES: tuple[PrivateName, ...] = ()

# -- training control, metrics and the other callbacks ------------------------------------------
_CONTROL: tuple[PrivateName, ...] = ()

# -- optim, cli and everything else -------------------------------------------------------------
_OTHER: tuple[PrivateName, ...] = ()

PRIVATE_NAMES: tuple[PrivateName, ...] = (*_DATA, *_IO, *_MODULES, *_CONTROL, *_OTHER)


def _resolve(entry: PrivateName) -> bool:
    try:
        obj: object = importlib.import_module(entry.module)
    except ImportError:
        return False
    parts = entry.attribute.split(".")
    if "<instance>" in parts:
        owner_path, name = parts[: parts.index("<instance>")], parts[-1]
        for part in owner_path:
            obj = getattr(obj, part, None)
            if obj is None:
                return False
        try:
            source = inspect.getsource(obj)  # type: ignore[arg-type]
        except (OSError, TypeError):
            return False
        return f"self.{name}" in source
    for part in parts:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def missing_private_names() -> list[PrivateName]:
    """The listed names that the installed Lightning / torch no longer has."""
    return [entry for entry in PRIVATE_NAMES if not _resolve(entry)]
