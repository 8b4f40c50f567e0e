"""Writes are atomic: a killed or failing writer never damages the file already at the path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_utils.io import atomic_write, load_state, save_state
from lightning_utils.io.atomic import TEMP_PREFIX

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
    with pytest.raises(RuntimeError, match="boom"), atomic_write(path) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_successful_write_replaces_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "sub" / "dir" / "x.sft"  # parents are created
    save_state({"a": torch.ones(1)}, path)
    inode = path.stat().st_ino
    save_state({"a": torch.zeros(1)}, path)
    assert path.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert os.listdir(path.parent) == ["x.sft"]
    assert torch.equal(load_state(path)["a"], torch.zeros(1))


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
