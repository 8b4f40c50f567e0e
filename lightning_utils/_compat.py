"""Old import paths of moved modules, kept working for one release with a ``DeprecationWarning``.

What it is for: users' code and LightningCLI YAML name classes by their import path
(``lightning_utils.samplers.RandomSampler``); when a module moves, its old path must keep
resolving to the very same objects for one release. One ``sys.meta_path`` finder maps each old
module name (and everything below it) to its new home, so no shim file per old module clutters
the package tree.

What it must never do: create a second copy of a module (the old name is an alias of the new
module object, so classes stay identical and ``isinstance`` holds), or import anything before
an old name is actually imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import inspect
import sys
import warnings
from types import ModuleType
from typing import Any

# old module name -> new module name. Remove an entry one release after it was added.
MOVED_MODULES: dict[str, str] = {
    "lightning_utils.samplers": "lightning_utils.data.samplers",
    "lightning_utils.dataloader": "lightning_utils.data.loader",
    "lightning_utils.offload": "lightning_utils.modules.offload",
    "lightning_utils.module_targets": "lightning_utils.modules.targets",
    "lightning_utils.module_swap": "lightning_utils.modules.swap",
    "lightning_utils.replacements": "lightning_utils.modules.presets",
    "lightning_utils.model_surgery": "lightning_utils.callbacks.module_transform",
    "lightning_utils.commands": "lightning_utils.control.commands",
    "lightning_utils.command_sources": "lightning_utils.control.sources",
    "lightning_utils.io.checkpoint_io": "lightning_utils.plugins.checkpoint_io",
    "lightning_utils.io.module_loading": "lightning_utils.plugins.module_loading",
}


def new_name(old: str) -> str | None:
    """The current name of the module once called ``old`` (or of a module below it), else None."""
    for prefix, target in MOVED_MODULES.items():
        if old == prefix or old.startswith(prefix + "."):
            return target + old[len(prefix) :]
    return None


def warn_moved(old: str, new: str) -> None:
    """One ``DeprecationWarning`` attributed to the code that used the old name."""
    warnings.warn(
        f"{old} moved to {new}; the old name keeps working for one release. Update the import or class path.",
        DeprecationWarning,
        stacklevel=_caller_stacklevel(),
    )


def _caller_stacklevel() -> int:
    """The stack level of the first frame outside this package's import plumbing.

    ``warnings.warn`` does not count the import machinery's frames, so neither does this; the
    ``__getattr__`` of a package that forwards a moved name is skipped too.
    """
    frame = inspect.currentframe()
    frame = frame.f_back if frame is not None else None
    level = 1
    while frame is not None:
        filename = frame.f_code.co_filename
        internal = "importlib" in filename and "_bootstrap" in filename
        if not internal:
            if filename != __file__ and frame.f_code.co_name != "__getattr__":
                return level
            level += 1
        frame = frame.f_back
    return 1


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warn_moved(self.old, self.new)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """The module under its new name is already executed."""


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        new = new_name(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(fullname, new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
