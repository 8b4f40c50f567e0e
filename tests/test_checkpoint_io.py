"""SafetensorsCheckpointIO inside real Lightning runs."""

from __future__ import annotations

import threading
import time

import lightning.pytorch as pl
import pytest
import torch
from helpers.lightning import cpu_trainer
from helpers.models import CountingCallback, TinyModule, loader
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from test_io_roundtrip import assert_same

from lightning_utils.callbacks import SafetensorsModelCheckpoint
from lightning_utils.io import load_state
from lightning_utils.plugins import (
    AsyncCheckpointIO,
    SafetensorsCheckpointIO,
    check_strategy_writes_through_checkpoint_io,
    load_from_checkpoint,
)


def _fit(tmp, max_steps, callbacks, ckpt_path=None, plugins=None):
    pl.seed_everything(0)
    model = TinyModule()
    t = cpu_trainer(tmp, max_steps=max_steps, callbacks=callbacks, plugins=plugins)
    t.fit(model, loader(), ckpt_path=ckpt_path)
    return t, model


def test_sft_checkpoint_holds_the_whole_state_equal_to_ckpt(tmp_path):
    cb_a, cb_b = CountingCallback(), CountingCallback()
    _fit(tmp_path / "a", 6, [cb_a, ModelCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=3, save_top_k=-1)])
    _fit(tmp_path / "b", 6, [cb_b, SafetensorsModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=3, save_top_k=-1)],
         plugins=[SafetensorsCheckpointIO()])  # fmt: skip
    for step in (3, 6):
        pt = load_state(tmp_path / "a" / f"epoch=0-step={step}.ckpt")
        sft = load_state(tmp_path / "b" / f"epoch=0-step={step}.sft")
        assert (tmp_path / "b" / f"epoch=0-step={step}.sft").read_bytes()[:4] != b"PK\x03\x04"
        for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "epoch", "global_step",
                    "hyper_parameters", "hparams_name", "pytorch-lightning_version"):  # fmt: skip
            assert_same(sft[key], pt[key], key)
        assert_same(sft["callbacks"]["CountingCallback"], pt["callbacks"]["CountingCallback"])
        assert list(sft) == list(pt)  # same top-level keys, same order
    # the weights are an ordinary safetensors file for other tools
    flat = load_file(tmp_path / "b" / "epoch=0-step=6.sft")
    assert set(TinyModule().state_dict()) <= {k.removeprefix("state_dict.") for k in flat}


@pytest.mark.parametrize("suffix", [".ckpt", ".sft"])
def test_resume_mid_training_matches_uninterrupted_run(tmp_path, suffix):
    # The checkpoint is taken at step 8 (the end of epoch 0 of 8 batches) of a 12-step run; exact
    # mid-*epoch* data resume is the ResumableDataLoader's job and is tested with it.
    full_cb = CountingCallback()
    full_t, full = _fit(tmp_path / "full", 12, [full_cb], plugins=[SafetensorsCheckpointIO()])
    ckpt_cls = SafetensorsModelCheckpoint if suffix == ".sft" else ModelCheckpoint
    _fit(tmp_path / "part", 10, [CountingCallback(), ckpt_cls(dirpath=tmp_path / "part", every_n_train_steps=8)],
         plugins=[SafetensorsCheckpointIO()])  # fmt: skip
    ckpt = tmp_path / "part" / f"epoch=0-step=8{suffix}"
    resumed_cb = CountingCallback()
    t, resumed = _fit(tmp_path / "resumed", 12, [resumed_cb, ckpt_cls(dirpath=tmp_path / "part", every_n_train_steps=8)],
                      ckpt_path=ckpt, plugins=[SafetensorsCheckpointIO()])  # fmt: skip
    assert t.global_step == 12 and resumed_cb.batches == 12
    assert resumed_cb.history == full_cb.history  # bit-identical losses after the resume
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 12
    assert t.optimizers[0].state_dict()["state"][0]["step"] == 12
    assert t.current_epoch == full_t.current_epoch
    assert t.fit_loop.epoch_loop.batch_progress.state_dict() == full_t.fit_loop.epoch_loop.batch_progress.state_dict()


def test_ckpt_path_last_and_top_k(tmp_path):
    cb = SafetensorsModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=2, save_top_k=2, monitor="step", mode="max", save_last=True
    )
    _fit(tmp_path, 8, [cb])  # no plugin given: the callback installs SafetensorsCheckpointIO
    files = sorted(p.name for p in tmp_path.glob("*.sft"))
    assert files == ["epoch=0-step=6.sft", "epoch=0-step=8.sft", "last.sft"]
    t, _ = _fit(tmp_path, 10, [SafetensorsModelCheckpoint(dirpath=tmp_path, save_last=True)], ckpt_path="last")
    assert t.global_step == 10


class SlowIO(SafetensorsCheckpointIO):
    """Makes saves slow so that a removal queued right after a save would race it."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        time.sleep(0.3)
        super().save_checkpoint(checkpoint, path, storage_options)


def test_async_checkpoint_io_orders_removals_after_saves(tmp_path):
    cb = SafetensorsModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=1, monitor="step", mode="max")
    main = threading.get_ident()
    io = AsyncCheckpointIO(SlowIO())
    _fit(tmp_path, 4, [cb], plugins=[io])
    assert sorted(p.name for p in tmp_path.glob("*.sft")) == ["epoch=0-step=4.sft"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lu-tmp-")]
    assert threading.get_ident() == main


def test_remove_checkpoint_waits_for_a_save_in_progress(tmp_path, monkeypatch):
    import lightning_utils.plugins.checkpoint_io as module

    real = module.save_state

    def slow_save_state(obj, path):
        time.sleep(0.3)  # the write itself is slow: the save is registered and in progress
        real(obj, path)

    monkeypatch.setattr(module, "save_state", slow_save_state)
    io = SafetensorsCheckpointIO()
    target = tmp_path / "x.sft"
    saver = threading.Thread(target=io.save_checkpoint, args=({"a": torch.ones(1)}, target))
    saver.start()
    time.sleep(0.05)
    io.remove_checkpoint(target)  # must wait for the save, then remove the finished file
    saver.join()
    assert not target.exists()
    io.remove_checkpoint(tmp_path / "never-existed.sft")  # removing nothing is fine


def test_plugin_signature_and_errors(tmp_path):
    io = SafetensorsCheckpointIO()
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"a": 1}, tmp_path / "x.sft", storage_options={"x": 1})
    io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "x.sft")
    for ml in (None, "cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda s, loc: s):
        assert torch.equal(
            io.load_checkpoint(tmp_path / "x.sft", map_location=ml, weights_only=True)["w"], torch.ones(2)
        )
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "missing.sft")


def test_load_from_checkpoint_reads_sft(tmp_path):
    _, model = _fit(tmp_path, 3, [SafetensorsModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3)])
    path = tmp_path / "epoch=0-step=3.sft"
    loaded = load_from_checkpoint(TinyModule, path)
    assert loaded.hparams.root == model.hparams.root and loaded.hparams.hidden == 8
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    wider = load_from_checkpoint(TinyModule, path, lr=0.5)  # kwargs override hparams
    assert wider.hparams.lr == 0.5
    with pytest.raises(ValueError, match="Lightning checkpoint"):
        from lightning_utils.io import save_state

        save_state({"w": torch.ones(1)}, tmp_path / "w.sft")
        load_from_checkpoint(TinyModule, tmp_path / "w.sft")


def test_strategies_that_bypass_checkpoint_io_are_refused():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    with pytest.raises(RuntimeError, match="FSDP.*'.sft'"):
        check_strategy_writes_through_checkpoint_io(FSDPStrategy(), ".sft")
    check_strategy_writes_through_checkpoint_io(FSDPStrategy(), ".ckpt")  # torch files: Lightning's own path
    check_strategy_writes_through_checkpoint_io(DDPStrategy(), "run/last.sft")
    check_strategy_writes_through_checkpoint_io(SingleDeviceStrategy("cpu"), ".sft")


def test_a_foreign_checkpoint_plugin_is_not_silently_replaced(tmp_path):
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class MyIO(TorchCheckpointIO):
        pass

    with pytest.raises(RuntimeError, match="MyIO"):
        _fit(tmp_path, 2, [SafetensorsModelCheckpoint(dirpath=tmp_path)], plugins=[MyIO()])
