"""ReplaceModules in a Trainer: replaced in setup, the optimizer holds the new parameters, strict
resume, a second entry point replaces nothing again, the LightningModule itself is refused.

Which modules are replaced and how weights carry over: ``tests/modules/test_swap.py``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers.lightning import OptimizerHoldsModelParameters, cpu_trainer
from torch import nn

from lightning_utils.callbacks.replace_modules import ReplaceModules
from lightning_utils.io import load_state


class MyLinear(nn.Linear):
    """An exact replacement: same math, a marker to tell it apart."""

    def forward(self, x):
        return super().forward(x)


class LM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.seen_types: list[type] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        self.seen_types = [type(m) for m in self.model]
        x = x.to(self.model[0].weight.dtype)
        return (self.model(x) - x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(16, 8, generator=g)), batch_size=4
        )


class _CheckOptimizer(OptimizerHoldsModelParameters):
    def check_more(self, held, pl_module):
        assert {id(p) for p in pl_module.model[0].parameters()} <= held


_trainer = cpu_trainer


class FreshLinear(nn.Linear):
    pass


def _to_float64(name, old):
    return FreshLinear(old.in_features, old.out_features, dtype=torch.float64)


@pytest.mark.parametrize("suffix", [".ckpt", ".sft"])
def test_lightning_fit_and_strict_resume(tmp_path, suffix):
    pl.seed_everything(0)
    model = LM()
    check = _CheckOptimizer()
    # float64 replacements: the weights are copied into new Parameter objects, and the
    # optimizer must hold these, not the old ones
    cb = ReplaceModules(nn.Linear, _to_float64)
    old_ids = {id(p) for p in model.parameters()}
    trainer = _trainer(tmp_path / "a", [cb, check], 2, suffix)
    trainer.fit(model)
    assert check.ok and model.seen_types[0] is FreshLinear
    assert not ({id(p) for p in model.parameters()} & old_ids)
    ckpt = tmp_path / f"replaced{suffix}"
    trainer.save_checkpoint(ckpt)
    state = load_state(ckpt)
    assert set(state["state_dict"]) == {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"}

    resumed = LM()
    check2 = _CheckOptimizer()
    cb2 = ReplaceModules(nn.Linear, _to_float64)
    trainer2 = _trainer(tmp_path / "b", [cb2, check2], 4, suffix)
    trainer2.fit(resumed, ckpt_path=ckpt)
    assert trainer2.global_step == 4 and check2.ok
    assert resumed.seen_types[0] is FreshLinear
    # momentum buffers were restored into the optimizer that holds the new parameters
    opt = trainer2.optimizers[0]
    assert all("momentum_buffer" in opt.state[p] for p in resumed.parameters())
    # and a second entry point (validate/test call setup again) does not replace again
    cb2.setup(trainer2, resumed, "validate")
    assert cb2.replaced == ["model.0", "model.2"]


def test_callback_refuses_to_replace_the_lightning_module(tmp_path):
    cb = ReplaceModules(pl.LightningModule, MyLinear)
    with pytest.raises(ValueError, match="root module itself"):
        _trainer(tmp_path, [cb], 1).fit(LM())
