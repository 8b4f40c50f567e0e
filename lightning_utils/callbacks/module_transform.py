"""The module callbacks' shared base: when they change the LightningModule, which submodules, and logging.

What it is for: ``ActivationOffload``, ``ReplaceModules`` and ``CompileModules`` are thin
subclasses of :class:`ModuleTransform`, which reads their ``target`` / ``include`` / ``exclude``
arguments the same way, gives each an ``apply(module)`` for plain modules, transforms the
LightningModule at the right moment of a Trainer run, logs on rank zero and warns when nothing
matched.

The moment: Lightning 2.6 ``Trainer._run`` calls, in order: the callbacks' ``setup``, the
LightningModule's ``setup``, ``configure_model``, the checkpoint restore
(``_restore_modules_and_callbacks``, which loads the state dict), then ``strategy.setup`` (which
wraps the model and builds the optimizers). A callback that swaps, wraps or compiles submodules
must act before the restore (so state-dict keys match) and before the optimizers exist (so they
hold the new parameters). Its own ``setup`` is the earliest point, but layers created in
``configure_model`` do not exist yet then. So ``transform_before_restore`` transforms the module
right away and, when the LightningModule overrides ``configure_model``, once more right after it
returns: a one-shot hook object is put on the instance in front of ``configure_model`` (its
``__wrapped__`` lets Lightning's ``is_overridden`` see the user's method); it runs the registered
transforms in callback order and removes itself, so the module pickles and deep-copies normally
after the run.

Transforms must be idempotent: ``setup`` runs again for every ``fit``/``validate``/``test`` call.
This module must never touch a model that a strategy has already wrapped (DDP/FSDP).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_utils.modules.targets import Target, describe_target, resolve_target

__all__ = ["ModuleTransform", "check_not_wrapped", "transform_before_restore"]

_MISSING = object()


class _ConfigureModelHook:
    """Stands in for ``module.configure_model`` until it has been called once: calls the real
    one, then every registered transform (in registration order), then puts the real one back."""

    def __init__(self, module: LightningModule, inner: Any):
        self.module = module
        self.inner = inner  # an instance-level configure_model that was already there, or _MISSING
        self.transforms: dict[str, Callable[[nn.Module], Any]] = {}

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        if self.inner is not _MISSING:
            return self.inner
        return type(self.module).configure_model.__get__(self.module)

    def uninstall(self) -> None:
        if vars(self.module).get("configure_model") is self:
            if self.inner is _MISSING:
                del self.module.configure_model
            else:
                self.module.configure_model = self.inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.uninstall()
        result = self.__wrapped__(*args, **kwargs)
        for transform in self.transforms.values():
            transform(self.module)
        return result


def check_not_wrapped(module: nn.Module, argument: str = "module") -> None:
    """Refuse a module already wrapped by DDP / DataParallel: surgery must happen on the inner one."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(module, (DistributedDataParallel, DataParallel)):
        raise TypeError(
            f"`{argument}` is wrapped in {type(module).__name__}; apply the transformation to "
            "`module.module` (or, in Lightning, from a callback's setup(), which runs before the "
            "strategy wraps the model)"
        )


def transform_before_restore(pl_module: LightningModule, key: str, transform: Callable[[nn.Module], Any]) -> None:
    """Apply ``transform(pl_module)`` now and again right after ``pl_module.configure_model()``.

    ``key`` identifies the caller so that repeated ``setup`` calls wrap ``configure_model`` once.
    """
    check_not_wrapped(pl_module, "pl_module")
    transform(pl_module)
    if not is_overridden("configure_model", pl_module):
        return
    hook = vars(pl_module).get("configure_model")
    if not isinstance(hook, _ConfigureModelHook):
        hook = _ConfigureModelHook(pl_module, vars(pl_module).get("configure_model", _MISSING))
        pl_module.configure_model = hook  # type: ignore[method-assign]
    hook.transforms[key] = transform


class ModuleTransform(Callback):
    """Base of the callbacks that transform submodules matching a ``target`` (see the module doc).

    A subclass sets :attr:`label` and :attr:`nothing_done`, and implements :meth:`_transform`
    (which records what it did) and :meth:`_transformed` (the names recorded so far).

    Args:
        target: a module class, a tuple of classes, an import path or a predicate
            ``(name, module) -> bool`` (see ``lightning_utils.modules.targets``); ``None`` only
            where :attr:`target_optional` says the subclass has a meaning for it.
        include / exclude: qualified-name patterns (dotted prefix or glob) limiting where
            ``target`` is looked for; ``exclude`` wins; ``None`` means everywhere.
        verbose: log what was transformed on rank zero.
    """

    label: ClassVar[str] = "ModuleTransform"
    """The callback's name in messages."""
    nothing_done: ClassVar[str] = "nothing was transformed"
    """The end of the warning given when no submodule matched by the start of ``fit``."""
    target_optional: ClassVar[bool] = False
    """Whether ``target=None`` is allowed."""

    def __init__(
        self,
        target: Target | None,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        verbose: bool = False,
    ) -> None:
        if target is not None or not self.target_optional:
            resolve_target(target)  # fail at construction on a bad target, naming the argument
        self.target = target
        self.include = None if include is None else list(include)
        self.exclude = None if exclude is None else list(exclude)
        self.verbose = verbose

    def apply(self, module: nn.Module) -> nn.Module:
        """Transform a plain ``nn.Module`` outside a Trainer and return it: the same object,
        transformed in place, or (``ReplaceModules``, when the root itself matches) its
        replacement. Refuses a DDP / DataParallel wrapper; warns when nothing matched."""
        check_not_wrapped(module)
        result = self._transform(module, root_replaceable=True)
        if not self._transformed():
            warnings.warn(self._nothing_matched(), UserWarning, stacklevel=2)
        return result

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        transform_before_restore(pl_module, f"{self.label}@{id(self)}", self._transform_lightning_module)

    def _transform_lightning_module(self, module: nn.Module) -> nn.Module:
        return self._transform(module, root_replaceable=False)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._transformed():
            rank_zero_warn(self._nothing_matched())

    def _nothing_matched(self) -> str:
        """The warning for a target that matched no submodule, naming it and the name policy."""
        policy = "".join(
            f", {arg}={patterns!r}"
            for arg, patterns in (("include", self.include), ("exclude", self.exclude))
            if patterns is not None
        )
        return f"{self.label}: no submodule matched target={describe_target(self.target)}{policy}; {self.nothing_done}"

    def _log(self, message: str) -> None:
        """``message`` on rank zero, when ``verbose``."""
        if self.verbose:
            rank_zero_info(f"{self.label}: {message}")

    def _transform(self, module: nn.Module, root_replaceable: bool) -> nn.Module:
        """Transform the matching submodules of ``module`` (idempotently) and return ``module``,
        or its replacement when ``root_replaceable`` (false for the Trainer's LightningModule,
        which cannot be swapped for another object)."""
        raise NotImplementedError

    def _transformed(self) -> list[str]:
        """The qualified names transformed so far."""
        raise NotImplementedError
