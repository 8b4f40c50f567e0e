"""The one CPU Trainer builder the tests fit and resume with, and callbacks that check a fit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_utils.plugins import SafetensorsCheckpointIO


def cpu_trainer(
    root: Any, callbacks: Sequence[pl.Callback] = (), max_steps: int = -1, suffix: str = ".ckpt", **kwargs: Any
) -> pl.Trainer:
    """A quiet single-process CPU Trainer that writes nothing unless asked.

    ``suffix=".sft"`` adds ``SafetensorsCheckpointIO`` (unless ``plugins`` is given); Lightning's
    default checkpointing is off unless a ``ModelCheckpoint`` is among the callbacks.
    """
    callbacks = list(callbacks)
    options: dict[str, Any] = {
        "default_root_dir": root,
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "callbacks": callbacks,
        "logger": False,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "deterministic": True,
    }
    if suffix == ".sft" and "plugins" not in kwargs:
        options["plugins"] = [SafetensorsCheckpointIO()]
    options.update(kwargs)
    return pl.Trainer(**options)


class OptimizerHoldsModelParameters(pl.Callback):
    """Asserts, when training starts, that the optimizer holds exactly the module's parameters
    (a module swap before the optimizer is built must leave no stale ones); sets ``ok``."""

    ok = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        assert held == {id(p) for p in pl_module.parameters()}
        self.check_more(held, pl_module)
        self.ok = True

    def check_more(self, held: set[int], pl_module: pl.LightningModule) -> None:
        """Extra assertions for subclasses."""
