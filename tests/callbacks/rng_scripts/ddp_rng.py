"""2-rank gloo DDP: a dropout model whose ranks draw different noise; run as
``python ddp_rng.py OUT MAX_STEPS [CKPT]``. Each rank appends its losses to OUT/losses-rank{r}.json."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_utils.callbacks import RNGStateCheckpoint, SafetensorsModelCheckpoint
from lightning_utils.plugins import SafetensorsCheckpointIO


class Noisy(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = self.net(torch.ones(8, 4) * (1 + self.global_rank)).pow(2).mean() + torch.rand(()).item()
        self.losses.append(float(loss.detach()))
        return loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1, shuffle=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


if __name__ == "__main__":
    out, max_steps = Path(sys.argv[1]), int(sys.argv[2])
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    model = Noisy()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, plugins=[SafetensorsCheckpointIO()],
        callbacks=[RNGStateCheckpoint(), SafetensorsModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1)],
    )  # fmt: skip
    pl.seed_everything(11 + trainer.global_rank)  # ranks draw different noise on purpose
    trainer.fit(model, ckpt_path=ckpt)
    (out / f"losses-rank{trainer.global_rank}.json").write_text(json.dumps(model.losses))
    # Tear the gloo group down before the interpreter exits: left to exit-time destructors, its
    # worker threads sometimes abort the process ("terminate called without an active exception").
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
