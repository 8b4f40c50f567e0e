"""Two-rank gloo FSDP2 fits (Lightning's ModelParallelStrategy) with the module callbacks (for tests).

Usage: python fsdp_modules.py OUT_DIR. Each rank writes OUT_DIR/rank{r}.pt, a dict with

- ``replace``: ``ReplaceModules(nn.Linear, MyLinear)`` with the layers built in ``__init__``:
  what the optimizer and the modules hold when training starts (types, DTensor or not), the
  errors a second ReplaceModules gives on the sharded model (a Linear inside a block unit, the
  head unit), and the same report for layers built in ``configure_model`` and replaced there by
  hand (``ReplaceModules(...).apply``) before ``fully_shard``;
- ``{plain,offload,compile,offload_compile}_{before,after}``: the per-step losses and the
  final (gathered) parameters of plain FSDP2 runs and of runs with ``ActivationOffload`` /
  ``CompileModules`` / both on the blocks, applied before ``fully_shard`` (layers built in
  ``__init__``) and after it (layers built in ``configure_model``);
- ``nested_units_error``: what an offloaded block with a ``fully_shard`` unit inside it raises.

All runs share one launch: starting the two ranks (importing Lightning twice) costs far more
than these 3-step fits.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from lightning_utils._internals import is_compiled_in_place
from lightning_utils.callbacks import ActivationOffload, CompileModules, ReplaceModules
from lightning_utils.modules.offload import apply_activation_offload, is_offload_compiled, is_offloaded


class MyLinear(nn.Linear):
    """An exact replacement: same math, a marker to tell it apart."""


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(d, 32), nn.Linear(32, d), nn.Dropout(0.2)

    def forward(self, x):
        return x + self.drop(self.fc2(torch.relu(self.fc1(x))))


class LM(pl.LightningModule):
    def __init__(self, build_in_configure_model=False, replace_by_hand=False):
        super().__init__()
        self.replace_by_hand = replace_by_hand
        self.model = None if build_in_configure_model else self._build()
        self.losses = []

    @staticmethod
    def _build():
        torch.manual_seed(0)
        return nn.Sequential(Block(), Block(), nn.Linear(16, 16))

    def configure_model(self):
        if self.model is None:
            self.model = self._build()
            if self.replace_by_hand:
                ReplaceModules(nn.Linear, MyLinear).apply(self.model)
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model:  # each block and the head, then the root
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.model(x).pow(2).mean()
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(32, 16, generator=g))
        return torch.utils.data.DataLoader(data, batch_size=4)


class Counting:
    """A torch.compile backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


class Inspect(pl.Callback):
    """What the optimizer and the modules hold when training starts."""

    def __init__(self):
        self.report = {}

    def on_train_start(self, trainer, pl_module):
        held = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
        linears = [m for m in pl_module.model.modules() if isinstance(m, nn.Linear)]
        self.report = {
            "linear_types": sorted({type(m).__name__ for m in linears}),
            "all_replaced": all(isinstance(m, MyLinear) for m in linears),
            "head_is_unit": isinstance(pl_module.model[-1], FSDPModule),
            "module_params_dtensor": all(isinstance(p, DTensor) for m in linears for p in m.parameters()),
            "optimizer_holds_module_params": {id(p) for p in held} == {id(p) for p in pl_module.parameters()},
            "optimizer_params_dtensor": all(isinstance(p, DTensor) for p in held),
            "n_params": len(held),
        }


def fit(callbacks, build_in_configure_model=False, replace_by_hand=False):
    # each fit compiles afresh: the compiler's cache is per function, and code compiled for an
    # earlier fit's backend would be reused for the same block class
    torch.compiler.reset()
    pl.seed_everything(0)
    model = LM(build_in_configure_model, replace_by_hand)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=3,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    full = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()
    }
    blocks = [m for m in model.model if isinstance(m, Block)]
    state = {
        "units": all(isinstance(b, FSDPModule) for b in blocks),
        "offloaded": [is_offloaded(b) for b in blocks],
        "compiled": [is_compiled_in_place(b) or is_offload_compiled(b) for b in blocks],
        "graphs": sum(c.backend.graphs for c in callbacks if isinstance(c, CompileModules)),
    }
    return trainer, model, {"losses": model.losses, "params": full, "state": state}


def nested_units_error(mesh):
    """The error an offloaded block with fully_shard units inside it gives (on every rank alike)."""
    torch.manual_seed(0)
    block = Block()
    apply_activation_offload(block, Block)
    fully_shard(block.fc1, mesh=mesh)
    fully_shard(block, mesh=mesh)
    try:
        block(torch.randn(4, 16, requires_grad=True)).sum().backward()
    except RuntimeError as err:
        return str(err)
    return None


def main():
    out = Path(sys.argv[1])
    result = {}
    inspect = Inspect()
    trainer, model, _ = fit([ReplaceModules(nn.Linear, MyLinear), inspect])
    result["replace"] = {"report": inspect.report}
    for key, include in (("error", None), ("unit_error", ["2"])):  # a block's Linear, the head unit
        try:
            ReplaceModules(MyLinear, nn.Linear, include=include).apply(model.model)
        except ValueError as err:
            result["replace"][key] = str(err)
    inspect = Inspect()  # layers built in configure_model: replaced there, by hand, before fully_shard
    fit([inspect], build_in_configure_model=True, replace_by_hand=True)
    result["replace"]["by_hand_report"] = inspect.report

    _, _, result["plain_before"] = fit([])
    _, _, result["plain_after"] = fit([], build_in_configure_model=True)
    for name, make in (
        ("offload", lambda: [ActivationOffload(target=Block)]),
        ("compile", lambda: [CompileModules(target=Block, backend=Counting())]),
        (
            "offload_compile",
            lambda: [ActivationOffload(target=Block), CompileModules(target=Block, backend=Counting())],
        ),
    ):
        _, _, result[f"{name}_before"] = fit(make())
        _, _, result[f"{name}_after"] = fit(make(), build_in_configure_model=True)
    result["nested_units_error"] = nested_units_error(model.device_mesh["data_parallel"])
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
    # Tear the gloo group down before the interpreter exits: left to exit-time destructors, its
    # worker threads sometimes abort the process ("terminate called without an active exception").
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
