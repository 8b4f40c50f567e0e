"""``load_from_checkpoint`` reads ``.sft`` like Lightning reads ``.ckpt``, and strategies that bypass the
CheckpointIO plugin are refused for ``.sft`` (:mod:`lightning_utils.plugins.module_loading`)."""

from __future__ import annotations

import pytest
import torch
from helpers.models import TinyModule, fit_tiny

from lightning_utils.callbacks import SafetensorsModelCheckpoint
from lightning_utils.io import save_state
from lightning_utils.plugins import check_strategy_writes_through_checkpoint_io, load_from_checkpoint


def test_load_from_checkpoint_reads_sft(tmp_path):
    _, model = fit_tiny(tmp_path, 3, [SafetensorsModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3)])
    path = tmp_path / "epoch=0-step=3.sft"
    loaded = load_from_checkpoint(TinyModule, path)
    assert loaded.hparams.root == model.hparams.root and loaded.hparams.hidden == 8
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    wider = load_from_checkpoint(TinyModule, path, lr=0.5)  # kwargs override hparams
    assert wider.hparams.lr == 0.5
    save_state({"w": torch.ones(1)}, tmp_path / "w.sft")
    with pytest.raises(ValueError, match="Lightning checkpoint"):
        load_from_checkpoint(TinyModule, tmp_path / "w.sft")


def test_load_from_checkpoint_follows_lightning_for_hparams_file_and_overrides(tmp_path):
    """As in Lightning's ``load_from_checkpoint``: ``hparams_file=`` replaces the saved hparams, and
    keyword overrides are merged into ``checkpoint["hyper_parameters"]`` before
    ``on_load_checkpoint`` sees it."""
    from helpers.models import TinyModule

    from lightning_utils.plugins import load_from_checkpoint

    class Recording(TinyModule):
        def on_load_checkpoint(self, checkpoint):
            self.seen_lr = checkpoint["hyper_parameters"]["lr"]

    model = TinyModule(hidden=8)
    ckpt = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": "2.6.6",
    }
    save_state(ckpt, tmp_path / "m.sft")
    (tmp_path / "h.yaml").write_text("hidden: 8\nlr: 0.5\n")
    loaded = load_from_checkpoint(TinyModule, tmp_path / "m.sft", hparams_file=tmp_path / "h.yaml")
    assert loaded.hparams.lr == 0.5  # what TinyModule.load_from_checkpoint gives for a .ckpt
    rec = load_from_checkpoint(Recording, tmp_path / "m.sft", lr=0.7)
    assert rec.hparams.lr == 0.7 and rec.seen_lr == 0.7


def test_strategies_that_bypass_checkpoint_io_are_refused():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    with pytest.raises(RuntimeError, match="FSDP.*'.sft'"):
        check_strategy_writes_through_checkpoint_io(FSDPStrategy(), ".sft")
    check_strategy_writes_through_checkpoint_io(FSDPStrategy(), ".ckpt")  # torch files: Lightning's own path
    check_strategy_writes_through_checkpoint_io(DDPStrategy(), "run/last.sft")
    check_strategy_writes_through_checkpoint_io(SingleDeviceStrategy("cpu"), ".sft")


def test_load_from_checkpoint_migrates_a_checkpoint_from_an_older_lightning(tmp_path):
    import lightning

    class Recording(TinyModule):
        def on_load_checkpoint(self, checkpoint):
            self.versions = (checkpoint["legacy_pytorch-lightning_version"], checkpoint["pytorch-lightning_version"])

    model = TinyModule()
    ckpt = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": "1.9.0",
    }
    save_state(ckpt, tmp_path / "old.sft")
    loaded = load_from_checkpoint(Recording, tmp_path / "old.sft")
    assert loaded.versions == ("1.9.0", lightning.__version__)  # Lightning's migrations ran
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
