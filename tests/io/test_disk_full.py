"""A full disk (or quota, or file-size limit) during a save: one ``DiskFullError`` (an ``OSError``)
naming the path and the bytes the checkpoint needs, for ``.sft`` and ``.pt`` alike; the previous
file stays intact and nothing is left behind.

The file-size limit (``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored) makes the kernel fail a write
with ``EFBIG`` exactly where a full disk fails it with ``ENOSPC``; it runs in a subprocess so the
limit never touches the test session. ``ENOSPC`` and ``EDQUOT`` are raised where a network
filesystem reports them, at ``fsync``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_utils.io import CheckpointWriteError, DiskFullError, load_state, save_state

CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    import torch
    from lightning_utils.io import save_state
    path, limit = sys.argv[1], int(sys.argv[2])
    save_state({"version": 1, "w": torch.ones(16)}, path)  # well under the limit
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        save_state({"version": 2, "w": torch.ones(1 << 16)}, path)
    except BaseException as exc:
        print(json.dumps({
            "type": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
            "errno": getattr(exc, "errno", None), "message": str(exc),
            "path": getattr(exc, "path", None), "needed": getattr(exc, "needed", None),
        }))
    else:
        print(json.dumps({"type": None}))
    """
)


def _size_of(obj, suffix: str, tmp_path) -> int:
    """The size the file would have with room enough."""
    path = tmp_path / "roomy" / f"x{suffix}"
    save_state(obj, path)
    return path.stat().st_size


@pytest.mark.parametrize("suffix", [".sft", ".pt"])
def test_file_size_limit_mid_save_is_a_disk_full_error_naming_path_and_bytes(tmp_path, suffix):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / f"last{suffix}"
    limit = 64 * 1024  # the new checkpoint is 256 KiB of tensor data
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, str(script), str(path), str(limit)], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    needed = _size_of({"version": 2, "w": torch.ones(1 << 16)}, suffix, tmp_path)
    assert report["type"] == "DiskFullError", report
    assert {"OSError", "CheckpointWriteError"} <= set(report["mro"])
    assert report["errno"] == errno.EFBIG
    assert report["path"] == str(path) and report["needed"] == needed
    assert str(path) in report["message"] and f"{needed:,} bytes" in report["message"]
    # The previous checkpoint is intact and nothing is left beside it.
    assert load_state(path, weights_only=False)["version"] == 1
    assert sorted(p.name for p in run_dir.iterdir()) == [path.name]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
@pytest.mark.parametrize("suffix", [".sft", ".pt"])
def test_enospc_and_edquot_at_fsync_are_the_same_error(tmp_path, monkeypatch, suffix, code):
    path = tmp_path / f"c{suffix}"
    save_state({"version": 1, "w": torch.zeros(4)}, path)
    new = {"version": 2, "w": torch.ones(1000)}
    needed = _size_of(new, suffix, tmp_path)

    def no_room(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", no_room)
    with pytest.raises(DiskFullError) as info:
        save_state(new, path)
    monkeypatch.undo()
    exc = info.value
    assert isinstance(exc, OSError) and isinstance(exc, CheckpointWriteError)
    assert exc.errno == code and exc.path == str(path) and exc.needed == needed
    assert str(path) in str(exc) and f"{needed:,} bytes" in str(exc) and os.strerror(code) in str(exc)
    assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == code
    assert load_state(path, weights_only=False)["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "roomy"])


def test_other_os_errors_are_not_disk_full(tmp_path, monkeypatch):
    """Only EFBIG, ENOSPC and EDQUOT mean "no room"; an I/O error stays what it is."""

    def broken(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError) as info:
        save_state({"w": torch.ones(3)}, tmp_path / "c.sft")
    assert not isinstance(info.value, DiskFullError) and info.value.errno == errno.EIO


def test_needed_bytes_of_a_pt_are_exactly_what_torch_save_writes():
    from lightning_utils.io.torch_file import torch_save_size

    obj = {"a": torch.arange(1000), "b": [torch.ones(3, 3), "text"], "c": 1.5}
    buf = io.BytesIO()
    torch.save(obj, buf)
    assert torch_save_size(obj) == len(buf.getvalue())
