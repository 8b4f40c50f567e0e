"""When a module callback changes the LightningModule: in ``setup``, and again after ``configure_model``.

Lightning 2.6 ``Trainer._run`` calls, in order: the callbacks' ``setup``, the LightningModule's
``setup``, ``configure_model``, the checkpoint restore (``_restore_modules_and_callbacks``, which
loads the state dict), then ``strategy.setup`` (which wraps the model and builds the optimizers).
A callback that swaps, wraps or compiles submodules must act before the restore (so state-dict keys
match) and before the optimizers exist (so they hold the new parameters). Its own ``setup`` is the
earliest point, but layers created in ``configure_model`` do not exist yet then. So
``transform_before_restore`` transforms the module right away and, when the LightningModule
overrides ``configure_model``, once more right after it returns (by wrapping that bound method on
the instance with ``functools.wraps``, which Lightning's ``is_overridden`` sees through).

Transforms must be idempotent: ``setup`` runs again for every ``fit``/``validate``/``test`` call.
This module must never touch a model that a strategy has already wrapped (DDP/FSDP).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

__all__ = ["transform_before_restore", "check_not_wrapped"]

_KEYS_ATTR = "_lightning_utils_transform_keys"


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
    current = pl_module.configure_model
    keys = getattr(current, _KEYS_ATTR, ())
    if key in keys:
        return

    @functools.wraps(current)
    def configure_model_then_transform(*args: Any, **kwargs: Any) -> Any:
        result = current(*args, **kwargs)
        transform(pl_module)
        return result

    setattr(configure_model_then_transform, _KEYS_ATTR, (*keys, key))
    pl_module.configure_model = configure_model_then_transform  # type: ignore[method-assign]
