"""Checking, when ``fit`` starts, that the run's checkpoints can be written as ``.sft``.

A ``.sft`` refuses values it cannot represent without pickle (an arbitrary object in the
hyperparameters, a callback state holding a handle), naming the key path. Found at the first save,
that kills a run hours in; :func:`check_checkpoint_storable` runs the same checks on the parts of
the checkpoint that exist when ``fit`` starts (the module's weights, its and the datamodule's
hyperparameters, every callback's ``state_dict()``, the datamodule's, the optimizers' and
schedulers' state and the precision plugin's), under the keys Lightning saves them at. ``SafetensorsModelCheckpoint`` calls
it; any other callback that writes ``.sft`` checkpoints can too. What ``on_save_checkpoint``
hooks add later cannot be known in advance and is checked when it is saved.

What it must never do: change any state, or fail for a part it cannot read (an optimizer whose
``state_dict()`` needs a collective, say): only a value a ``.sft`` cannot hold is an error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lightning_utils.io.skeleton import check_storable


def check_checkpoint_storable(trainer: Any, writer: str = "a .sft checkpoint", weights_only: bool = False) -> None:
    """Raise ``TypeError`` now if a ``.sft`` checkpoint of this run could not hold its state.

    ``writer`` names what writes ``.sft`` files in the message (``"SafetensorsModelCheckpoint"``).
    ``weights_only=True`` checks only what a weights-only checkpoint holds (the hyperparameters).
    Cheap: no tensor data is copied. Call it from ``setup`` or ``on_fit_start``; parts that do
    not exist yet (optimizers before the strategy's setup) are skipped.
    """
    for key, read in _parts(trainer, weights_only):
        try:
            value = read()
        except Exception:  # noqa: BLE001 - a part that cannot be read now is checked when it is saved
            continue
        if not value:
            continue
        try:
            check_storable(value, key)
        except TypeError as exc:
            raise TypeError(
                f"{writer} writes .sft checkpoints, which cannot hold this run's state (checked when fit starts): {exc}"
            ) from None


def _hparams(obj: Any) -> dict[str, Any]:
    """The hyperparameters as Lightning saves them (a plain dict of ``obj.hparams``)."""
    return dict(obj.hparams)


def _weights(module: Any) -> dict[str, Any]:
    """The module's state dict as far as it is final when ``fit`` starts: ``DTensor`` entries are
    left to the sharded save (which checks their placements then), and so are weights not made
    yet (a lazy module's, or on the meta device), which the first forward or the strategy
    replaces. A quantized or other tensor subclass a ``.sft`` cannot hold is refused here,
    before the first step rather than at the first save."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor
    from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        return {}  # FSDP1: its state_dict() gathers every weight on every rank
    return {
        k: v.detach() if isinstance(v, torch.Tensor) else v  # as Lightning saves them
        for k, v in module.state_dict(keep_vars=True).items()
        if not isinstance(v, (DTensor, UninitializedParameter, UninitializedBuffer))
        and not getattr(v, "is_meta", False)
    }


def _parts(trainer: Any, weights_only: bool) -> Iterator[tuple[tuple[Any, ...], Callable[[], Any]]]:
    """``(key path, reader)`` for each part of the checkpoint Lightning will save, in its layout."""
    if trainer.lightning_module is not None:
        yield ("state_dict",), functools.partial(_weights, trainer.lightning_module)
    for obj in (trainer.lightning_module, trainer.datamodule):
        if obj is not None:
            yield (obj.CHECKPOINT_HYPER_PARAMS_KEY,), functools.partial(_hparams, obj)
    if trainer.datamodule is not None:
        dm = trainer.datamodule
        yield (type(dm).__qualname__,), dm.state_dict
    if weights_only:
        return
    for callback in trainer.callbacks:
        yield ("callbacks", callback.state_key), callback.state_dict
    for i, optimizer in enumerate(trainer.optimizers):
        yield ("optimizer_states", i), optimizer.state_dict
    for i, config in enumerate(trainer.lr_scheduler_configs):
        yield ("lr_schedulers", i), config.scheduler.state_dict
    precision = trainer.precision_plugin
    yield (type(precision).__qualname__,), precision.state_dict
