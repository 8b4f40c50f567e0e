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
from typing import TYPE_CHECKING

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
_IO: tuple[PrivateName, ...] = ()

# -- modules and module callbacks --------------------------------------------------------------
_MODULES: tuple[PrivateName, ...] = (
    PrivateName(
        module="torch._C._autograd",
        attribute="_get_current_graph_task_keep_graph",
        used_by="lightning_utils.modules.offload.function (through autograd_keeps_graph)",
        why="the backward of an offloaded block frees its pinned host copies, as autograd frees "
        "saved tensors, unless the running backward retains the graph (retain_graph=True): only "
        "this query tells an autograd Function's backward whether it does",
        public="torch.autograd.Function's ctx exposes needs_input_grad and saved_tensors but not "
        "retain_graph; ctx.save_for_backward would free the buffers at the right time, but "
        "saved-tensor hooks (save_on_cpu, an outer checkpoint) would then read them while the "
        "copy is in flight. Without the query the buffers are kept (the safe answer)",
    ),
    PrivateName(
        module="torch",
        attribute="Tensor._version",
        used_by="lightning_utils.modules.offload.host_copy (through tensor_version)",
        why="an input copied to the host and then changed in place before backward must be "
        "refused, as autograd refuses a modified saved tensor; the version counter is what "
        "autograd itself compares",
        public="torch.autograd.graph.increment_version only increments; saving the input with "
        "ctx.save_for_backward would give autograd's check but keeps the device tensor alive, "
        "which is what offloading avoids",
    ),
    PrivateName(
        module="torch.nn",
        attribute="Module._compiled_call_impl",
        used_by="lightning_utils.callbacks.compile_modules and lightning_utils.modules.swap "
        "(through is_compiled_in_place)",
        why="CompileModules must not compile a module twice, and ReplaceModules must refuse a "
        "module compiled in place (a replacement would silently drop the compiled call); "
        "Module.compile() records its compiled call only there",
        public="Module.compile() returns None and sets no public flag; isinstance(m, "
        "torch._dynamo.eval_frame.OptimizedModule) only detects torch.compile(m) wrappers, which "
        "CompileModules deliberately does not create",
    ),
    PrivateName(
        module="torch.nn",
        attribute="Module.<instance>._parameters",
        used_by="lightning_utils.modules.presets.SDPAMultiheadAttention.from_module (through "
        "shallow_copy_module, with _buffers and _modules)",
        why="re-classing an nn.MultiheadAttention keeps the very same Parameter objects, hooks "
        "and attributes; the copy needs registries of its own so that changing one module's "
        "parameters or children never changes the other's",
        public="copy.copy shares the registries; building a new module through its constructor "
        "initialises (and draws random numbers for) weights that are then thrown away, and drops "
        "hooks and attributes set on the old module; register_parameter on a shallow copy writes "
        "into the shared registry",
    ),
    PrivateName(
        module="torch.nn",
        attribute="Module.<instance>._buffers",
        used_by="lightning_utils.modules.presets (through shallow_copy_module)",
        why="as Module._parameters: the re-classed module's buffer registry must be its own",
        public="as Module._parameters",
    ),
    PrivateName(
        module="torch.nn",
        attribute="Module.<instance>._modules",
        used_by="lightning_utils.modules.presets (through shallow_copy_module)",
        why="as Module._parameters: the re-classed module's child registry must be its own",
        public="as Module._parameters",
    ),
)

if TYPE_CHECKING:
    from torch import Tensor, nn


def autograd_keeps_graph() -> bool:
    """Whether the backward now running keeps its graph (``retain_graph=True``); True when unknown."""
    import torch

    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def tensor_version(t: Tensor) -> int:
    """The in-place version counter of ``t`` (it grows with every in-place change)."""
    return t._version


def is_compiled_in_place(module: nn.Module) -> bool:
    """Whether ``module.compile()`` was called (its calls go through a compiled function)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def shallow_copy_module(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` holding the same parameters, buffers, children, hooks and
    attributes, but with registries of its own: registering or replacing a parameter, buffer or
    child on one of the two leaves the other as it was."""
    import copy

    new = copy.copy(module)
    for attr in ("_parameters", "_buffers", "_modules"):
        setattr(new, attr, dict(getattr(module, attr)))
    return new


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
