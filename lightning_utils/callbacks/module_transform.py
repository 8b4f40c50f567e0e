"""When a module callback changes the LightningModule: in ``setup``, and again after ``configure_model``.

Lightning 2.6 ``Trainer._run`` calls, in order: the callbacks' ``setup``, the LightningModule's
``setup``, ``configure_model``, the checkpoint restore (``_restore_modules_and_callbacks``, which
loads the state dict), then ``strategy.setup`` (which wraps the model and builds the optimizers).
A callback that swaps, wraps or compiles submodules must act before the restore (so state-dict keys
match) and before the optimizers exist (so they hold the new parameters). Its own ``setup`` is the
earliest point, but layers created in ``configure_model`` do not exist yet then. So
``transform_before_restore`` transforms the module right away and, when the LightningModule
overrides ``configure_model``, once more right after it returns: a one-shot hook object is put
on the instance in front of ``configure_model`` (its ``__wrapped__`` lets Lightning's
``is_overridden`` see the user's method); it runs the registered transforms in callback order and
removes itself, so the module pickles and deep-copies normally after the run.

Transforms must be idempotent: ``setup`` runs again for every ``fit``/``validate``/``test`` call.
This module must never touch a model that a strategy has already wrapped (DDP/FSDP).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

__all__ = ["check_not_wrapped", "transform_before_restore"]

_MISSING = object()


class _ConfigureModelHook:
    """Stands in for ``module.configure_model`` until it has been called once: calls the real
    one, then every registered transform (in registration order), then puts the real one back."""

    def __init__(self, module: nn.Module, inner: Any):
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
                self.module.configure_model = self.inner  # type: ignore[method-assign]

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
