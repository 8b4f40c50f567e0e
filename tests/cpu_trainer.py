"""The small CPU Trainer the module-callback tests fit and resume with."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_utils.plugins import SafetensorsCheckpointIO


def cpu_trainer(root: Any, callbacks: list, max_steps: int, suffix: str = ".ckpt", **kwargs: Any) -> pl.Trainer:
    """A quiet single-process CPU Trainer; ``suffix=".sft"`` adds ``SafetensorsCheckpointIO``."""
    return pl.Trainer(
        default_root_dir=root,
        plugins=[SafetensorsCheckpointIO()] if suffix == ".sft" else None,
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


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
