"""The tiny LightningModule, its data and a stateful callback that the Lightning tests share."""

from __future__ import annotations

import pathlib
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class TinyModule(pl.LightningModule):
    def __init__(self, hidden: int = 8, root: pathlib.Path = pathlib.Path("/data/run"), lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class CountingCallback(pl.Callback):
    """Callback with state, to check callback state round-trips."""

    def __init__(self) -> None:
        self.batches = 0
        self.history: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        self.history.append(float(outputs["loss"]))

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "history": list(self.history), "t": torch.tensor(self.batches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = state["batches"]
        self.history = list(state["history"])


def loader(n: int = 32, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(dim=1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def fit_tiny(
    root: Any,
    max_steps: int,
    callbacks: list[pl.Callback],
    ckpt_path: Any = None,
    plugins: list[Any] | None = None,
) -> tuple[pl.Trainer, TinyModule]:
    """Seed, build a ``TinyModule`` and fit it on :func:`loader` with the one CPU Trainer builder."""
    from helpers.lightning import cpu_trainer

    pl.seed_everything(0)
    model = TinyModule()
    trainer = cpu_trainer(root, max_steps=max_steps, callbacks=callbacks, plugins=plugins)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer, model
