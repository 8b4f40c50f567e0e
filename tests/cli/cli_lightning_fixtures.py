"""Tiny components for test_cli_lightning.py, chosen by class path from a YAML config.

Importable as ``cli_lightning_fixtures`` when its folder, ``tests/cli``, is on ``sys.path`` (the
tests put it there, and on ``PYTHONPATH`` for subprocesses).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, TensorDataset


class TinyRegressor(LightningModule):
    """A linear model on 4 features; no configure_optimizers, so the CLI's optimizer is used."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


class TinyData(LightningDataModule):
    """Random linear-regression data, the same for every run with the same ``seed``."""

    def __init__(self, size: int = 64, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.size, self.batch_size, self.seed = size, batch_size, seed

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.size, 4, generator=g)
        self.dataset = TensorDataset(x, x.sum(dim=1, keepdim=True))

    def _loader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


class RunRecorder(Callback):
    """Writes what the run was built from and reached to ``path`` (JSON) at the end of each stage.

    ``{rank}`` in ``path`` becomes the global rank, so that DDP ranks write separate files.
    """

    def __init__(self, path: str) -> None:
        self.path_template = path

    def _write(self, trainer: Any, pl_module: LightningModule, stage: str) -> None:
        self.path = Path(self.path_template.format(rank=trainer.global_rank))
        optimizers = trainer.optimizers
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        record = json.loads(self.path.read_text()) if self.path.exists() else {}
        record[stage] = {
            "global_step": trainer.global_step,
            "model": type(pl_module).__qualname__,
            "hidden": pl_module.hparams.get("hidden"),
            "layer_width": pl_module.net[0].out_features,
            "note": getattr(pl_module, "note", None),
            "pattern": repr(getattr(pl_module, "pattern", None)),
            "datamodule": type(trainer.datamodule).__qualname__ if trainer.datamodule is not None else None,
            "optimizer": [type(o).__qualname__ for o in optimizers],
            "lr": [group["lr"] for o in optimizers for group in o.param_groups],
            "lr_scheduler": [type(s).__qualname__ for s in schedulers],
            "checkpoint_io": type(trainer.strategy.checkpoint_io).__qualname__,
            "callbacks": [type(c).__qualname__ for c in trainer.callbacks],
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__qualname__,
        }
        self.path.write_text(json.dumps(record))

    def on_train_end(self, trainer: Any, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "fit")

    def on_validation_end(self, trainer: Any, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "validate":
            self._write(trainer, pl_module, "validate")

    def on_test_end(self, trainer: Any, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "test")

    def on_predict_end(self, trainer: Any, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "predict")


class CountingCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O that also appends every path it saves to ``log``."""

    def __init__(self, log: str | None = None) -> None:
        super().__init__()
        self.log = log

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{path}\n")


class PatternRegressor(TinyRegressor):
    """Takes a component by class path and leaves it (and ``note``) out of its saved hyperparameters,
    as models do for modules and other objects they are given."""

    def __init__(self, pattern: Any, hidden: int = 8, note: str = "") -> None:
        super().__init__(hidden)
        self.save_hyperparameters(ignore=["pattern", "note"])
        self.pattern, self.note = pattern, note
