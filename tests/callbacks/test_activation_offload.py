"""ActivationOffload in a Trainer: same training as without it, strict resume, DDP, arguments.

The offloading itself is tested in ``tests/modules/test_offload.py``.
"""

from __future__ import annotations

import copy
import functools
import pickle

import lightning.pytorch as pl
import pytest
import torch
from helpers.blocks import Block, D
from helpers.lightning import OptimizerHoldsModelParameters, cpu_trainer
from helpers.ranks import run_launcher
from torch import nn

from lightning_utils.callbacks.activation_offload import ActivationOffload
from lightning_utils.io import load_state
from lightning_utils.modules.offload import is_offloaded


def test_callback_arguments_and_apply():
    with pytest.raises(TypeError, match="`target`"):
        ActivationOffload(target=42)
    with pytest.raises(ValueError, match="`min_bytes`"):
        ActivationOffload(target=Block, min_bytes=-1)
    cb = ActivationOffload(target="torch.nn.Linear")
    m = cb.apply(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert cb.wrapped == ["0"] and is_offloaded(m[0])


class TinyLM(pl.LightningModule):
    def __init__(self, build_in_configure_model: bool = False):
        super().__init__()
        self.build_late = build_in_configure_model
        self.embed = nn.Embedding(32, D)
        self.blocks = None if build_in_configure_model else nn.Sequential(Block(), Block())
        self.head = nn.Linear(D, 32)

    def configure_model(self):
        if self.blocks is None:
            self.blocks = nn.Sequential(Block(), Block())

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        h = self.blocks(self.embed(tokens[:, :-1]))
        logits = self.head(h)
        return nn.functional.cross_entropy(logits.reshape(-1, 32), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, 32, (16, 9), generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)


_trainer = functools.partial(cpu_trainer, num_sanity_val_steps=0)


_CheckOptimizer = OptimizerHoldsModelParameters


@pytest.mark.parametrize(
    ("late", "suffix"), [(False, ".ckpt"), (True, ".sft")], ids=["init-ckpt", "configure_model-sft"]
)
def test_lightning_fit_matches_plain_and_resumes(tmp_path, late, suffix):
    pl.seed_everything(0)
    plain = TinyLM(late)
    _trainer(tmp_path / "a", [], 3).fit(plain)

    pl.seed_everything(0)
    model = TinyLM(late)
    cb = ActivationOffload(target=Block)
    check = _CheckOptimizer()
    trainer = _trainer(tmp_path / "b", [cb, check], 3, suffix)
    trainer.fit(model)
    assert cb.wrapped == ["blocks.0", "blocks.1"] and check.ok
    assert all(is_offloaded(b) for b in model.blocks)
    for (n, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)

    ckpt = tmp_path / f"offload{suffix}"
    trainer.save_checkpoint(ckpt)
    resumed = TinyLM(late)
    cb2, check2 = ActivationOffload(target=Block), _CheckOptimizer()
    trainer2 = _trainer(tmp_path / "c", [cb2, check2], 5, suffix)
    trainer2.fit(resumed, ckpt_path=ckpt)  # strict load (Lightning's default)
    assert trainer2.global_step == 5 and check2.ok
    assert all(is_offloaded(b) for b in resumed.blocks)
    # the checkpoint also loads into a model without the callback (same keys)
    TinyLM(False).load_state_dict(load_state(ckpt)["state_dict"], strict=True)


def test_callback_warns_when_nothing_matches(tmp_path):
    with pytest.warns(UserWarning, match="no submodule matched"):
        _trainer(tmp_path, [ActivationOffload(target=nn.GRU)], 1).fit(TinyLM())


def test_module_stays_picklable_and_copies_independent_after_a_fit(tmp_path):
    """The configure_model hook must not outlive the Trainer run: after fit the LightningModule
    pickles (torch.save(model)) and a deep copy's configure_model builds the copy's layers."""
    model = TinyLM(build_in_configure_model=True)
    _trainer(tmp_path, [ActivationOffload(target=Block)], 1).fit(model)
    assert "configure_model" not in vars(model)
    clone = pickle.loads(pickle.dumps(model))
    assert all(is_offloaded(b) for b in clone.blocks)
    copied = copy.deepcopy(model)
    copied.blocks = None
    copied.configure_model()
    assert copied.blocks is not None and model.blocks is not copied.blocks
    # a second entry point transforms the layers configure_model builds again
    model.blocks = None
    trainer = _trainer(tmp_path, [ActivationOffload(target=Block)], 1)
    trainer.fit(model)
    assert all(is_offloaded(b) for b in model.blocks)


@pytest.mark.ddp
def test_ddp_two_ranks_same_result_as_plain(tmp_path):
    """Under DDP (gloo, 2 CPU ranks) the offloaded run trains exactly like the plain one: the
    parameter gradients come out of the autograd function, so DDP's reducer sees them normally."""
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "ddp_offload.py"
    results = {}
    for mode in ("plain", "offload"):
        out = tmp_path / mode
        out.mkdir()
        proc = run_launcher([str(script), str(out), mode])
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[mode] = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    for mode in results:
        for k, v in results[mode][0].items():
            torch.testing.assert_close(results[mode][1][k], v, atol=0, rtol=0)  # ranks in sync
    for k, v in results["plain"][0].items():
        torch.testing.assert_close(results["offload"][0][k], v, atol=1e-6, rtol=0, msg=k)
