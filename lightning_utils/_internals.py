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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

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
# torch's multi-tensor ("foreach") kernels that Apollo's step batches its elementwise work with.
_FOREACH_OPS = (
    "_foreach_add_",
    "_foreach_addcdiv_",
    "_foreach_addcmul_",
    "_foreach_copy_",
    "_foreach_div_",
    "_foreach_lerp_",
    "_foreach_mul_",
    "_foreach_sqrt",
)

_OTHER: tuple[PrivateName, ...] = (
    PrivateName(
        module="lightning.pytorch.cli",
        attribute="LightningCLI._parse_ckpt_path",
        used_by="lightning_utils.cli.lightning, through lightning_cli_class() below",
        why="LightningCLI calls this method after parsing the arguments and before instantiating the "
        "classes, to re-read the model's saved hyperparameters from --ckpt_path with torch.load, which "
        "cannot read a safetensors .sft checkpoint; the override reads .sft files with lightning_utils.io "
        "and leaves every other file to Lightning's own method",
        public="LightningCLI.parse_arguments and before_instantiate_classes are public hooks that run "
        "before and after this step, but neither replaces it: Lightning's torch.load of the .sft file would "
        "still run (and fail) in between unless ckpt_path were hidden from the config and restored, which "
        "depends on the same private ordering and is harder to follow",
    ),
    *(
        PrivateName(
            module="torch",
            attribute=name,
            used_by="lightning_utils.optim.apollo",
            why="Apollo's step updates every tensor of a param group in one multi-tensor kernel per "
            "operation (moments, limiter, update, weight decay), as torch.optim.AdamW(foreach=True) does",
            public="the public per-tensor in-place ops give the same values but one kernel launch per "
            "tensor, which makes the step several times slower on models with many small tensors; torch "
            "has no public multi-tensor API",
        )
        for name in _FOREACH_OPS
    ),
)


def lightning_cli_class(read_ckpt_hparams: Callable[[LightningCLI], bool]) -> type[LightningCLI]:
    """A ``LightningCLI`` subclass that offers its ``--ckpt_path`` hyperparameter step to
    ``read_ckpt_hparams(cli)`` first.

    LightningCLI re-reads the model's saved hyperparameters from ``--ckpt_path`` after parsing
    the arguments and before instantiating the classes. In the returned class that step calls
    ``read_ckpt_hparams(cli)``, which updates ``cli.config`` and returns True for a file it
    handles, or returns False to leave the file to Lightning's own code (``torch.load``).
    """
    from lightning.pytorch.cli import LightningCLI

    class _LightningUtilsCLI(LightningCLI):
        def _parse_ckpt_path(self) -> None:
            if not read_ckpt_hparams(self):
                super()._parse_ckpt_path()

    return _LightningUtilsCLI


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
