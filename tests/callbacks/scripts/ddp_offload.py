"""Two-rank gloo DDP fit of a tiny block stack, with or without ActivationOffload (for tests).

Usage: python ddp_offload.py OUT_DIR {plain,offload}. Each rank writes its final parameters to
OUT_DIR/rank{r}.pt.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_utils.callbacks.activation_offload import ActivationOffload


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(d, 32), nn.Linear(32, d), nn.Dropout(0.2)

    def forward(self, x):
        return x + self.drop(self.fc2(torch.relu(self.fc1(x))))


class LM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.blocks(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(32, 16, generator=g))
        return torch.utils.data.DataLoader(data, batch_size=4)


def main():
    out, mode = Path(sys.argv[1]), sys.argv[2]
    pl.seed_everything(0)
    model = LM()
    callbacks = [ActivationOffload(target=Block)] if mode == "offload" else []
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"rank{trainer.global_rank}.pt")
    # Tear the gloo group down before the interpreter exits: left to exit-time destructors, its
    # worker threads sometimes abort the process ("terminate called without an active exception").
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
