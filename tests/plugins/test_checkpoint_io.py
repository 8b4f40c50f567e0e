"""``SafetensorsCheckpointIO`` and ``AsyncCheckpointIO`` (:mod:`lightning_utils.plugins.checkpoint_io`),
alone and inside real Lightning runs."""

from __future__ import annotations

import pathlib
import threading
import time
import types

import pytest
import torch
from helpers.checkpoints import Custom, assert_same
from helpers.models import CountingCallback, TinyModule, fit_tiny
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open
from safetensors.torch import load_file

from lightning_utils.callbacks import SafetensorsModelCheckpoint
from lightning_utils.io import UnsafeCheckpointError, load_state
from lightning_utils.plugins import AsyncCheckpointIO, SafetensorsCheckpointIO, ensure_safetensors_checkpoint_io


def test_sft_checkpoint_holds_the_whole_state_equal_to_ckpt(tmp_path):
    cb_a, cb_b = CountingCallback(), CountingCallback()
    fit_tiny(tmp_path / "a", 6, [cb_a, ModelCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=3, save_top_k=-1)])
    fit_tiny(tmp_path / "b", 6, [cb_b, SafetensorsModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=3, save_top_k=-1)],
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
    full_t, full = fit_tiny(tmp_path / "full", 12, [full_cb], plugins=[SafetensorsCheckpointIO()])
    ckpt_cls = SafetensorsModelCheckpoint if suffix == ".sft" else ModelCheckpoint
    fit_tiny(tmp_path / "part", 10, [CountingCallback(), ckpt_cls(dirpath=tmp_path / "part", every_n_train_steps=8)],
         plugins=[SafetensorsCheckpointIO()])  # fmt: skip
    ckpt = tmp_path / "part" / f"epoch=0-step=8{suffix}"
    resumed_cb = CountingCallback()
    t, resumed = fit_tiny(tmp_path / "resumed", 12, [resumed_cb, ckpt_cls(dirpath=tmp_path / "part", every_n_train_steps=8)],
                      ckpt_path=ckpt, plugins=[SafetensorsCheckpointIO()])  # fmt: skip
    assert t.global_step == 12 and resumed_cb.batches == 12
    assert resumed_cb.history == full_cb.history  # bit-identical losses after the resume
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 12
    assert t.optimizers[0].state_dict()["state"][0]["step"] == 12
    assert t.current_epoch == full_t.current_epoch
    assert t.fit_loop.epoch_loop.batch_progress.state_dict() == full_t.fit_loop.epoch_loop.batch_progress.state_dict()


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


def test_plugin_load_keeps_cpu_and_forwards_weights_only(tmp_path):
    io = SafetensorsCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "root": pathlib.PosixPath("/x")}, tmp_path / "c.ckpt")
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "c.sft")
    for name in ("c.ckpt", "c.sft"):
        out = io.load_checkpoint(tmp_path / name, weights_only=True)
        assert out["state_dict"]["w"].device.type == "cpu"
    io.save_checkpoint({"obj": Custom(3)}, tmp_path / "u.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        io.load_checkpoint(tmp_path / "u.ckpt", weights_only=True)
    assert io.load_checkpoint(tmp_path / "u.ckpt", weights_only=False)["obj"] == Custom(3)


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


class SlowIO(SafetensorsCheckpointIO):
    """Makes saves slow so that a removal queued right after a save would race it."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        time.sleep(0.3)
        super().save_checkpoint(checkpoint, path, storage_options)


def test_async_checkpoint_io_orders_removals_after_saves(tmp_path):
    cb = SafetensorsModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=1, monitor="step", mode="max")
    main = threading.get_ident()
    io = AsyncCheckpointIO(SlowIO())
    fit_tiny(tmp_path, 4, [cb], plugins=[io])
    assert sorted(p.name for p in tmp_path.glob("*.sft")) == ["epoch=0-step=4.sft"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lu-tmp-")]
    assert threading.get_ident() == main


def test_async_checkpoint_io_keeps_tied_weights_and_views_shared(tmp_path):
    """The caller-thread snapshot clones each storage once: tied weights and views stay shared
    (stored once), one object reached twice stays one object, and later in-place updates are
    not saved."""
    w = torch.randn(6, 4)
    ckpt = {"state_dict": {"emb.weight": w, "head.weight": w, "half": w[:3]}, "again": [w]}
    io = AsyncCheckpointIO(SafetensorsCheckpointIO())
    io.save_checkpoint(ckpt, tmp_path / "a.sft")
    snapshot = w.clone()
    w.add_(1.0)  # the save must still see the values at the time of the call
    io.teardown()
    out = load_state(tmp_path / "a.sft")
    sd = out["state_dict"]
    assert torch.equal(sd["emb.weight"], snapshot)
    assert sd["emb.weight"].untyped_storage().data_ptr() == sd["head.weight"].untyped_storage().data_ptr()
    assert sd["half"].untyped_storage().data_ptr() == sd["emb.weight"].untyped_storage().data_ptr()
    with safe_open(tmp_path / "a.sft", "pt") as f:
        assert len(list(f.keys())) == 1  # stored once, as the synchronous plugin does


def test_lightning_async_wrapper_under_sft_model_checkpoint_has_no_remove_race(tmp_path, monkeypatch):
    """With Lightning's own ``AsyncCheckpointIO``, ``ensure_safetensors_checkpoint_io`` (run by
    SafetensorsModelCheckpoint.setup) installs ours, so a top-k removal queued behind the save
    of the same file runs after it and the removed checkpoint stays removed (Lightning's
    wrapper removes synchronously, before the queued save has even started)."""
    import threading

    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.plugins.io import AsyncCheckpointIO as LightningAsyncCheckpointIO

    import lightning_utils.plugins.checkpoint_io as module

    gate = threading.Event()
    real = module.save_state

    def gated_save_state(obj, path):
        if pathlib.Path(path).name == "busy.sft":
            assert gate.wait(10)
        real(obj, path)

    monkeypatch.setattr(module, "save_state", gated_save_state)
    strategy = types.SimpleNamespace(checkpoint_io=LightningAsyncCheckpointIO(TorchCheckpointIO()))
    ensure_safetensors_checkpoint_io(strategy)
    io = strategy.checkpoint_io
    io.save_checkpoint({"a": torch.ones(1)}, tmp_path / "busy.sft")  # occupies the single worker
    io.save_checkpoint({"a": torch.ones(1)}, tmp_path / "old.sft")  # queued behind it
    io.remove_checkpoint(tmp_path / "old.sft")  # top-k drops it
    gate.set()
    io.teardown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy.sft"]


def test_a_torch_checkpoint_io_inside_another_wrapper_is_swapped_in_place():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    wrapper = AsyncCheckpointIO(TorchCheckpointIO())
    strategy = types.SimpleNamespace(checkpoint_io=wrapper)
    ours = ensure_safetensors_checkpoint_io(strategy)
    assert strategy.checkpoint_io is wrapper and wrapper.checkpoint_io is ours
    assert ensure_safetensors_checkpoint_io(strategy) is ours  # found again through the wrapper


class FailingIO(SafetensorsCheckpointIO):
    """Saves fail once ``go`` is set; removing ``locked.sft`` fails, any other removal sets ``removed``."""

    def __init__(self):
        super().__init__()
        self.go = threading.Event()
        self.removed = threading.Event()

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        assert self.go.wait(10)
        raise OSError(28, "No space left on device")

    def remove_checkpoint(self, path):
        if pathlib.Path(path).name == "locked.sft":
            raise PermissionError(path)
        self.removed.set()


def test_async_checkpoint_io_raises_a_queued_failure_on_the_caller_thread(tmp_path):
    base = FailingIO()
    io = AsyncCheckpointIO(base)
    io.save_checkpoint({"a": torch.ones(1)}, tmp_path / "a.sft")  # queued: returns before it fails
    base.go.set()
    with pytest.raises(OSError, match="No space left"):
        io.teardown()  # waits for the queued save, then raises its error
    io = AsyncCheckpointIO(FailingIO())
    io.remove_checkpoint(tmp_path / "locked.sft")
    with pytest.raises(PermissionError):
        io.teardown()
    base = FailingIO()
    io = AsyncCheckpointIO(base)
    io.save_checkpoint({"a": torch.ones(1)}, tmp_path / "a.sft")
    io.remove_checkpoint(tmp_path / "a.sft")  # runs after the failed save, on the same worker
    base.go.set()
    assert base.removed.wait(10)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"a": torch.ones(1)}, tmp_path / "b.sft")  # the next save raises it
