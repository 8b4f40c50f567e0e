"""``AsyncCheckpointIO`` with sharded saves, in one process: the caller waits only for the host copy of
its shards, and a queued removal of a directory never runs before (or during) its save."""

from __future__ import annotations

import threading

import torch

import lightning_utils.io.sharded.writer as writer
from lightning_utils.io import load_state
from lightning_utils.io.sharded import TensorShard
from lightning_utils.plugins import AsyncCheckpointIO, SafetensorsCheckpointIO


def state(value: float) -> dict:
    block = torch.full((4, 3), value)
    return {"step": int(value), "state_dict": {"w": TensorShard(block, (4, 3), (0, 0))}, "b": torch.ones(2) * value}


def test_the_save_holds_the_state_of_the_call_not_of_later_training(tmp_path, monkeypatch):
    release = threading.Event()
    original = writer.write_entries

    def slow_write(f, specs, metadata):
        release.wait(10)  # the worker writes only after the caller changed its tensors
        original(f, specs, metadata)

    monkeypatch.setattr(writer, "write_entries", slow_write)
    io = AsyncCheckpointIO(SafetensorsCheckpointIO())
    live = state(1.0)
    io.save_distributed_checkpoint(live, tmp_path / "a.sft")  # returns after the host copy
    live["state_dict"]["w"].local.fill_(7.0)  # training goes on, in place
    live["b"].fill_(7.0)
    release.set()
    io.teardown()
    saved = load_state(tmp_path / "a.sft")
    assert torch.equal(saved["state_dict"]["w"], torch.ones(4, 3)) and torch.equal(saved["b"], torch.ones(2))


def test_a_queued_removal_waits_for_the_save_of_that_directory(tmp_path):
    io = AsyncCheckpointIO(SafetensorsCheckpointIO())
    io.save_distributed_checkpoint(state(1.0), tmp_path / "step=1.sft")
    io.save_distributed_checkpoint(state(2.0), tmp_path / "step=2.sft")
    io.remove_checkpoint(tmp_path / "step=1.sft")  # save_top_k=1 drops the older one
    io.save_distributed_checkpoint(state(3.0), tmp_path / "last.sft")
    io.teardown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.sft", "step=2.sft"]
    assert load_state(tmp_path / "step=2.sft")["step"] == 2


def test_a_removal_of_a_directory_being_saved_waits_for_the_save(tmp_path, monkeypatch):
    started, release = threading.Event(), threading.Event()
    original = writer.write_entries

    def slow_write(f, specs, metadata):
        started.set()
        release.wait(10)
        original(f, specs, metadata)

    monkeypatch.setattr(writer, "write_entries", slow_write)
    io = SafetensorsCheckpointIO()
    saving = threading.Thread(target=io.save_distributed_checkpoint, args=(state(1.0), tmp_path / "x.sft"))
    saving.start()
    started.wait(10)
    removing = threading.Thread(target=io.remove_checkpoint, args=(tmp_path / "x.sft",))
    removing.start()
    removing.join(0.5)
    assert removing.is_alive()  # waits: the directory is being written
    release.set()
    saving.join(10)
    removing.join(10)
    assert list(tmp_path.iterdir()) == []  # saved, then removed; no staging directory left
