"""Writes are atomic (:mod:`lightning_utils.io.atomic`): a killed or failing writer never damages the
file already at the path and leaves no temp file under the final name."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_utils.io import atomic_write, load_state, save_state
from lightning_utils.io.atomic import TEMP_PREFIX


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


# The child saves version 1, then starts saving version 2 and is killed while writing tensor
# data (signalled through a patched write function), or at a random point of a .pt save.
CHILD = textwrap.dedent(
    """
    import sys, time, torch
    import lightning_utils.io.safetensors_file as sft
    from lightning_utils.io import save_state
    path, mode = sys.argv[1], sys.argv[2]
    save_state({"version": 1, "w": torch.full((1 << 20,), 1.0)}, path)
    real = sft.write_all
    def slow_write(fd, data):
        real(fd, data[: len(data) // 2])
        print("MID-WRITE", flush=True)
        time.sleep(60)
    sft.write_all = slow_write
    print("READY", flush=True)
    if mode == "sft":
        save_state({"version": 2, "w": torch.full((1 << 20,), 2.0)}, path)
    else:
        while True:
            save_state({"version": 2, "w": torch.full((1 << 22,), 2.0)}, path)
    """
)


@pytest.mark.parametrize("suffix", [".sft", ".pt"])
def test_killed_writer_leaves_previous_file_intact(tmp_path, suffix):
    path = tmp_path / f"ckpt{suffix}"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    for attempt in range(1 if suffix == ".sft" else 3):  # the .sft kill point is deterministic
        proc = subprocess.Popen([sys.executable, str(script), str(path), suffix[1:]], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "READY"
            if suffix == ".sft":
                assert proc.stdout.readline().strip() == "MID-WRITE"
            else:
                import time

                time.sleep(0.05 + 0.1 * attempt)  # somewhere inside a stream of large saves
            assert any(p.name.startswith(TEMP_PREFIX) for p in tmp_path.iterdir()) or suffix == ".pt"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        state = load_state(path)
        assert state["version"] in (1, 2)
        assert torch.all(state["w"] == float(state["version"]))
        if suffix == ".sft":
            assert state["version"] == 1


def test_exception_mid_write_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def write_then_fail():
        with atomic_write(path) as f:
            f.write(b"partial")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_then_fail()
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["ENOSPC", "Ctrl-C"])
def test_write_failure_mid_data_keeps_previous_file_and_no_temp(tmp_path, monkeypatch, exc):
    import lightning_utils.io.atomic as atomic

    target = tmp_path / "ckpt.sft"
    save_state({"w": torch.zeros(4)}, target)
    before = target.read_bytes()
    calls = {"n": 0}
    real_write = os.write

    def failing_write(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:  # the first tensor went out, the second fails
            raise exc
        return real_write(fd, data)

    monkeypatch.setattr(atomic.os, "write", failing_write)
    with pytest.raises(type(exc)):
        save_state({"a": torch.ones(1000), "b": torch.ones(1000, dtype=torch.float16)}, target)
    monkeypatch.undo()
    assert target.read_bytes() == before and _listing(tmp_path) == ["ckpt.sft"]


def test_failed_save_keeps_previous_file_for_both_formats(tmp_path):
    for suffix in (".sft", ".ckpt"):
        target = tmp_path / f"keep{suffix}"
        save_state({"v": 1}, target)
        before = target.read_bytes()
        bad = {"deep": {0: [{"x": lambda: None}]}}
        with pytest.raises((TypeError, AttributeError, pickle.PicklingError)) as info:
            save_state(bad, target)
        if suffix == ".sft":
            assert "checkpoint['deep'][0][0]['x']" in str(info.value)
        assert target.read_bytes() == before
    assert _listing(tmp_path) == ["keep.ckpt", "keep.sft"]


def test_successful_write_replaces_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "sub" / "dir" / "x.sft"  # parents are created
    save_state({"a": torch.ones(1)}, path)
    inode = path.stat().st_ino
    save_state({"a": torch.zeros(1)}, path)
    assert path.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert os.listdir(path.parent) == ["x.sft"]
    assert torch.equal(load_state(path)["a"], torch.zeros(1))


@pytest.mark.parametrize("suffix", [".sft", ".pt"])
def test_a_local_save_fsyncs_the_file_then_renames_it_then_fsyncs_the_directory(tmp_path, monkeypatch, suffix):
    """Durability, in this order: the staged file's data reaches the disk before the rename makes it
    the checkpoint, and the directory entry the rename changed is flushed after it."""
    path = tmp_path / f"x{suffix}"
    save_state({"a": torch.ones(4)}, path)  # a previous checkpoint: the save below replaces it
    opened: dict[int, str] = {}
    events: list[tuple] = []
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def spy_open(file, flags, *args, **kwargs):
        fd = real_open(file, flags, *args, **kwargs)
        opened[fd] = os.fspath(file)
        return fd

    def spy_fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", opened[fd], st.st_size if not os.path.isdir(opened[fd]) else "dir"))
        real_fsync(fd)

    def spy_replace(src, dst, *args, **kwargs):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    save_state({"a": torch.zeros(1 << 16), "step": 5}, path)
    monkeypatch.undo()

    assert len(events) == 3, events
    (_, synced, size), (_, src, dst), (_, dir_synced, kind) = events
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    staged = Path(synced)
    assert staged.parent == tmp_path and staged.name.startswith(TEMP_PREFIX)  # staged beside it, not in $TMPDIR
    assert size == path.stat().st_size  # every byte was written before the fsync
    assert (src, dst) == (synced, os.fspath(path))  # the fsynced file is the one renamed into place
    assert (dir_synced, kind) == (os.fspath(tmp_path), "dir")  # then the directory holding the new entry
    assert torch.equal(load_state(path)["a"], torch.zeros(1 << 16))
    assert _listing(tmp_path) == [path.name]


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_state({"a": 1}, tmp_path / "p.sft")
    finally:
        os.umask(old)
    assert (tmp_path / "p.sft").stat().st_mode & 0o777 == 0o644


def test_refuses_to_write_over_a_directory(tmp_path):
    (tmp_path / "d.sft").mkdir()
    with pytest.raises(IsADirectoryError, match="d.sft"):
        save_state({"a": 1}, tmp_path / "d.sft")


def test_long_file_names_can_be_saved(tmp_path):
    """The staged temp name keeps at most 200 bytes of the target's name, so every name the
    filesystem takes (up to 255 bytes) can be saved."""
    target = tmp_path / ("c" * 246 + ".sft")
    with open(tmp_path / ("d" * 246 + ".sft"), "wb"):
        pass  # the filesystem takes such a name
    save_state({"a": torch.ones(1)}, target)
    assert torch.equal(load_state(target)["a"], torch.ones(1))
