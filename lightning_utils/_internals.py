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
_IO: tuple[PrivateName, ...] = ()

# -- modules and module callbacks --------------------------------------------------------------
_MODULES: tuple[PrivateName, ...] = ()

# -- training control, metrics and the other callbacks ------------------------------------------
_CONTROL_USER = "lightning_utils.callbacks.training_control"
_CONTROL_EVAL_WHY = (
    "the 'eval' command runs the fit's own validation loop at a step boundary, exactly as the epoch loop does at "
    "a val check (trainer.validating, val_loop.run(), then the logger connector's first-iteration flag put back)"
)
_CONTROL_EVAL_PUBLIC = (
    "Lightning has no public 'validate now' during fit: val_check_interval is fixed when fit starts, and "
    "trainer.validate() is a run of its own (its own setup and teardown), not a step of a running fit; users "
    "who want no internals pass eval_fn="
)
_CONTROL: tuple[PrivateName, ...] = (
    PrivateName(
        "lightning.pytorch.trainer.trainer",
        "Trainer.<instance>._accelerator_connector",
        _CONTROL_USER,
        "a single-device run keeps its cluster environment (SLURM auto-requeue and its signal) only there; "
        "TrainingControl leaves the requeue signal to Lightning, as Lightning's signal connector reads it",
        "trainer.strategy.cluster_environment: only parallel strategies have it, and it is read first",
    ),
    PrivateName(
        "lightning.pytorch.trainer.connectors.accelerator_connector",
        "_AcceleratorConnector.<instance>.cluster_environment",
        _CONTROL_USER,
        "see Trainer._accelerator_connector",
        "trainer.strategy.cluster_environment (parallel strategies only)",
    ),
    PrivateName(
        "lightning.pytorch.loops.fit_loop",
        "_FitLoop.<instance>.epoch_loop",
        _CONTROL_USER,
        _CONTROL_EVAL_WHY,
        _CONTROL_EVAL_PUBLIC,
    ),
    PrivateName(
        "lightning.pytorch.loops.training_epoch_loop",
        "_TrainingEpochLoop.<instance>.val_loop",
        _CONTROL_USER,
        _CONTROL_EVAL_WHY,
        _CONTROL_EVAL_PUBLIC,
    ),
    PrivateName(
        "lightning.pytorch.loops.evaluation_loop",
        "_EvaluationLoop.run",
        _CONTROL_USER,
        _CONTROL_EVAL_WHY,
        _CONTROL_EVAL_PUBLIC,
    ),
    PrivateName(
        "lightning.pytorch.trainer.trainer",
        "Trainer.<instance>._logger_connector",
        _CONTROL_USER,
        _CONTROL_EVAL_WHY,
        _CONTROL_EVAL_PUBLIC,
    ),
    PrivateName(
        "lightning.pytorch.trainer.connectors.logger_connector.logger_connector",
        "_LoggerConnector.<instance>._first_loop_iter",
        _CONTROL_USER,
        "a validation run changes the logger connector's first-iteration flag; the epoch loop saves it before its "
        "own val checks inside the training loop and puts it back after, so the 'eval' command does the same",
        _CONTROL_EVAL_PUBLIC,
    ),
    PrivateName(
        "torch.optim.lr_scheduler",
        "SequentialLR.<instance>._schedulers",
        "lightning_utils.control.actions",
        "the 'lr' command rebases the schedulers a SequentialLR holds, so that their closed-form schedules "
        "continue from the new lr",
        "none: SequentialLR exposes its schedulers only as state_dict()['_schedulers'], copies of their states",
    ),
    PrivateName(
        "torch.optim.lr_scheduler",
        "ChainedScheduler.<instance>._schedulers",
        "lightning_utils.control.actions",
        "the 'lr' command rebases the schedulers a ChainedScheduler holds (see SequentialLR._schedulers)",
        "none: ChainedScheduler exposes its schedulers only as state_dict()['_schedulers'], copies of their states",
    ),
)


def cluster_environment(trainer: Any) -> Any:
    """The trainer's cluster environment: the strategy's (parallel strategies), else the one
    Lightning's accelerator connector chose (single-device runs); ``None`` when neither is found."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None:
        env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return env


def run_fit_validation(trainer: Any) -> bool:
    """Run the fit loop's validation loop now, as the training epoch loop does at a val check.

    Returns False, having run nothing, when this Lightning keeps these internals elsewhere.
    """
    try:
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        connector = trainer._logger_connector
        first_loop_iter = connector._first_loop_iter
    except AttributeError:  # pragma: no cover - a Lightning that moved these internals
        return False
    trainer.validating = True
    try:
        val_loop.run()
    finally:
        trainer.training = True
        connector._first_loop_iter = first_loop_iter
    return True


def inner_lr_schedulers(scheduler: Any) -> list[Any]:
    """The schedulers a ``SequentialLR`` or ``ChainedScheduler`` holds; ``[]`` for any other scheduler."""
    inner = getattr(scheduler, "_schedulers", None)
    return list(inner) if isinstance(inner, (list, tuple)) else []


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
