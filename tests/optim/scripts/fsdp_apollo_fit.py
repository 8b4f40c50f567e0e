"""Apollo / ApolloMini under Lightning's ModelParallelStrategy (FSDP2, gloo, CPU), for the tests.

Usage: python fsdp_apollo_fit.py OUT_DIR

Every rank is started by Lightning's launcher (devices=2, data_parallel_size=2). ``Net`` holds
two copies of ``Body``: ``apollo`` trained by ``Apollo`` and ``mini`` by ``ApolloMini`` (manual
optimization, one batch per step). A first Trainer fits 8 steps, saving a distributed checkpoint
at step 5 (``OUT_DIR/step5``); a second resumes from it to step 8. Rank 0 writes the gathered
(unsharded) parameters after every step of each run to ``OUT_DIR/full.pt`` and
``OUT_DIR/resumed.pt``.

The test imports ``Body``, ``make_optimizer``, ``loss_fn`` and ``batch`` to train the same run in
one process with the global batch, the reference for the sharded run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the checkout under test

from lightning_utils.optim import Apollo, ApolloMini, apollo_param_groups

STEPS = 8
GLOBAL_BATCH = 8
D = 16


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of a step: the same in every process, whatever the loader position."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, D, generator=gen)
    return x, torch.randn(GLOBAL_BATCH, 5, generator=gen), torch.randn(GLOBAL_BATCH, 1, generator=gen)


class Body(nn.Module):
    """Matrices of every kind the sharded update meets: (48, 16) is projected on the right
    (rows stay local), (16, 48), (5, 16) and (1, 16) on the left (rows summed across ranks);
    (5, 16) splits 3/2 rows and (1, 16) leaves rank 1 an empty shard; biases and the norm
    get AdamW."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initial weights in every process
        self.fc1 = nn.Linear(D, 3 * D)
        self.fc2 = nn.Linear(3 * D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 5)
        self.tiny = nn.Linear(D, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))
        return self.head(h), self.tiny(h)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    out, tiny = model(x)
    return (out - y).pow(2).mean() + (tiny - z).pow(2).mean()


def make_optimizer(name: str, module: nn.Module) -> torch.optim.Optimizer:
    groups = apollo_param_groups(module, include=["*"], exclude=["*.bias", "norm.*"])
    if name == "apollo":
        return Apollo(groups, lr=1e-2, rank=3, update_proj_gap=3, weight_decay=0.01)
    if name == "apollo-right":
        return Apollo(groups, lr=1e-2, rank=3, update_proj_gap=3, proj_type="right", scale_type="tensor")
    return ApolloMini(groups, lr=1e-2, update_proj_gap=3, weight_decay=0.01)


NAMES = ("apollo", "mini")


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.bodies = nn.ModuleDict({name: Body() for name in NAMES})

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for body in self.bodies.values():
            for module in body.modules():
                if isinstance(module, nn.Linear):
                    fully_shard(module, mesh=mesh)
            fully_shard(body, mesh=mesh)

    def training_step(self, _batch: Any, batch_idx: int) -> None:
        x, y, z = batch(self.global_step)
        rows = slice(self.global_rank * GLOBAL_BATCH // 2, (self.global_rank + 1) * GLOBAL_BATCH // 2)
        optimizers = self.optimizers()
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(sum(loss_fn(body, x[rows], y[rows], z[rows]) for body in self.bodies.values()))
        optimizers[0].step()
        # Lightning counts every LightningOptimizer step as a global step: the second optimizer
        # steps directly, so that one batch is one global step.
        optimizers[1].optimizer.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [make_optimizer(name, self.bodies[name]) for name in NAMES]

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(64, 1)), batch_size=1)


def gathered(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded parameters (a test-only all-gather), named ``{optimizer}.{param}``."""
    return {name[len("bodies.") :]: p.full_tensor().detach().clone() for name, p in module.named_parameters()}


class Recorder(pl.Callback):
    def __init__(self, save_at: Path | None = None) -> None:
        self.params: dict[int, dict[str, torch.Tensor]] = {}
        self.save_at = save_at

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.params[trainer.global_step] = gathered(pl_module)
        if self.save_at is not None and trainer.global_step == 5:
            trainer.save_checkpoint(self.save_at)


def trainer(root: Path, callbacks: list[pl.Callback]) -> pl.Trainer:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=STEPS,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    full = Recorder(args.out / "step5")
    first = trainer(args.out, [full])
    first.fit(Net())
    resumed = Recorder()
    second = trainer(args.out, [resumed])
    second.fit(Net(), ckpt_path=args.out / "step5")
    if first.global_rank == 0:
        torch.save(full.params, args.out / "full.pt")
        torch.save(resumed.params, args.out / "resumed.pt")


if __name__ == "__main__":
    main()
