"""CompileModules: in-place compile, keys without ``_orig_mod.``, Lightning fit + strict resume.

Most tests use a counting backend or ``aot_eager`` (fast, no C compiler); one test runs the real
inductor backend on a tiny module when a C compiler is present.
"""

from __future__ import annotations

import shutil

import lightning.pytorch as pl
import pytest
import torch
from helpers.lightning import OptimizerHoldsModelParameters, cpu_trainer
from torch import nn

from lightning_utils.callbacks.compile_modules import CompileModules
from lightning_utils.io import load_state


class CountingBackend:
    """A torch.compile backend that records each graph it is given and runs it eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return torch.relu(self.fc(x)) + x


def _net():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), nn.Linear(8, 2))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def test_compiles_whole_module_in_place_keys_unchanged():
    net = _net()
    x = torch.randn(3, 8)
    expected = net(x)
    keys = list(net.state_dict())
    backend = CountingBackend()
    cb = CompileModules(backend=backend)
    assert cb.apply(net) is net
    assert cb.compiled == [""]
    torch.testing.assert_close(net(x), expected)
    assert backend.graphs >= 1
    assert list(net.state_dict()) == keys and not any("_orig_mod" in k for k in net.state_dict())
    cb.apply(net)  # idempotent
    assert cb.compiled == [""]


def test_compiles_matching_submodules_only():
    net = _net()
    backend = CountingBackend()
    cb = CompileModules(target=Block, backend=backend)
    cb.apply(net)
    assert cb.compiled == ["0", "1"]
    assert net[0]._compiled_call_impl is not None and net[2]._compiled_call_impl is None
    net(torch.randn(2, 8))
    assert backend.graphs >= 1
    cb.apply(net)
    assert cb.compiled == ["0", "1"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="`backend`"):
        CompileModules(backend="no-such-backend")
    with pytest.raises(ValueError, match="`mode` and `options`"):
        CompileModules(mode="max-autotune", options={"a": 1})
    with pytest.raises(TypeError, match="`target`"):
        CompileModules(target=3.5)


@pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor on CPU needs a C compiler"
)
def test_inductor_backend_on_cpu():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(2, 4)
    expected = net(x)
    CompileModules(backend="inductor").apply(net)
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
    assert list(net.state_dict()) == ["0.weight", "0.bias"]


class LM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(Block(), Block())

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self(x) - x.flip(-1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(16, 8, generator=g)), batch_size=4
        )


_CheckOptimizer = OptimizerHoldsModelParameters


_trainer = cpu_trainer


@pytest.mark.parametrize(("target", "suffix"), [(None, ".ckpt"), (Block, ".sft")], ids=["whole-ckpt", "blocks-sft"])
def test_lightning_fit_and_strict_resume(tmp_path, target, suffix):
    backend = CountingBackend()
    pl.seed_everything(0)
    model = LM()
    cb, check = CompileModules(target=target, backend=backend), _CheckOptimizer()
    trainer = _trainer(tmp_path / "a", [cb, check], 2, suffix)
    trainer.fit(model)
    assert check.ok and backend.graphs >= 1
    ckpt = tmp_path / f"compiled{suffix}"
    trainer.save_checkpoint(ckpt)
    keys = set(load_state(ckpt)["state_dict"])
    assert keys == {"model.0.fc.weight", "model.0.fc.bias", "model.1.fc.weight", "model.1.fc.bias"}

    resumed = LM()
    cb2, check2 = CompileModules(target=target, backend="aot_eager"), _CheckOptimizer()
    trainer2 = _trainer(tmp_path / "b", [cb2, check2], 4, suffix)
    trainer2.fit(resumed, ckpt_path=ckpt)
    assert trainer2.global_step == 4 and check2.ok and cb2.compiled
    # an uncompiled model loads the same checkpoint strictly
    LM().load_state_dict(load_state(ckpt)["state_dict"], strict=True)
