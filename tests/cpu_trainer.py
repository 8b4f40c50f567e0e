"""The small CPU Trainer the module-callback tests fit and resume with."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_utils.io import SafetensorsCheckpointIO


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
