"""``RecordingModule``: a Linear(4 -> 1) regression that records what the run did to it.

For the tests of TrainingControl and the other run-time callbacks (CPU, fast): it keeps the
(step, lr) after every optimizer step, every training loss, the steps at which an ``eval_fn``
or its own validation ran, and can sleep or print its steps for the subprocess tests. It logs
``loss`` per step and an epoch-level ``sync_dist`` metric. The plain tiny module shared by the
other tests is ``helpers.models.TinyModule``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, TensorDataset


class RecordingModule(LightningModule):
    """Linear(4 -> 1) on fixed random data; records (step, lr) after every optimizer step, and more."""

    def __init__(
        self,
        lr: float = 0.1,
        sleep: float = 0.0,
        print_steps: bool = False,
        with_val: bool = False,
        n: int = 64,
        batch_size: int = 4,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)
        self.lr_trace: list[tuple[int, float]] = []
        self.evals: list[int] = []
        self.val_steps: list[int] = []
        self.losses: list[float] = []
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True)

    def training_step(self, batch, batch_idx):
        if self.hparams.sleep:
            time.sleep(self.hparams.sleep)
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("loss", loss, on_step=True, prog_bar=False)
        # an epoch-level synced metric: reading callback_metrics is then a collective under DDP
        self.log("loss_epoch_synced", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.losses.append(float(loss.detach()))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.trainer.global_step
        self.lr_trace.append((step, float(self.trainer.optimizers[0].param_groups[0]["lr"])))
        if self.hparams.print_steps and self.trainer.is_global_zero:
            print(f"STEP {step}", flush=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.hparams.batch_size)

    def dump(self, path: str | os.PathLike) -> None:
        Path(path).write_text(
            json.dumps(
                {
                    "rank": self.trainer.global_rank,
                    "global_step": self.trainer.global_step,
                    "lr_trace": self.lr_trace,
                    "evals": self.evals,
                    "val_steps": self.val_steps,
                }
            )
        )


class RecordingModuleWithVal(RecordingModule):
    """With a validation step and loader; records the steps at which validation ran."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("val_loss", loss)
        return loss

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.val_steps.append(self.trainer.global_step)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:8], self.y[:8]), batch_size=4)
