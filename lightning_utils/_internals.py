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
