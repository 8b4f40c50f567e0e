"""``lightning-utils inspect`` and ``convert``: output, exit codes, safety."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_io_roundtrip import assert_same
from test_io_torch import Custom

from lightning_utils.cli import main
from lightning_utils.io import load_state, save_state


@pytest.fixture
def ckpt():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {
        "state_dict": model.state_dict(),
        "optimizer_states": [opt.state_dict()],
        "epoch": 1,
        "bf": torch.zeros(2, 2, dtype=torch.bfloat16),
    }


def test_inspect_sft_and_ckpt(tmp_path, ckpt, capsys):
    save_state(ckpt, tmp_path / "c.sft")
    save_state(ckpt, tmp_path / "c.ckpt")
    assert main(["inspect", str(tmp_path / "c.sft")]) == 0
    out_sft = capsys.readouterr().out
    assert "weight: tensor float32 [3, 4] 48 B" in out_sft and "bf: tensor bfloat16 [2, 2]" in out_sft
    assert "exp_avg_sq: tensor float32 [3, 4]" in out_sft and "epoch: 1" in out_sft
    assert main(["inspect", str(tmp_path / "c.ckpt")]) == 0
    out_ckpt = capsys.readouterr().out
    assert out_sft.splitlines()[1:] == out_ckpt.splitlines()[1:]  # the same tree for both formats
    assert main(["inspect", str(tmp_path / "c.sft"), "--depth", "1"]) == 0
    assert "weight" not in capsys.readouterr().out


def test_inspect_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.sft")]) == 1
    assert "missing.sft" in capsys.readouterr().err
    (tmp_path / "junk.sft").write_bytes(b"not a checkpoint")
    assert main(["inspect", str(tmp_path / "junk.sft")]) == 1
    assert "junk.sft" in capsys.readouterr().err


def test_convert_both_ways(tmp_path, ckpt, capsys):
    save_state(ckpt, tmp_path / "c.ckpt")
    assert main(["convert", str(tmp_path / "c.ckpt"), str(tmp_path / "c.sft")]) == 0
    assert_same(load_state(tmp_path / "c.sft"), load_state(tmp_path / "c.ckpt"))
    assert main(["convert", str(tmp_path / "c.sft"), str(tmp_path / "back.pt")]) == 0
    assert_same(load_state(tmp_path / "back.pt"), load_state(tmp_path / "c.ckpt"))
    assert main(["convert", str(tmp_path / "c.ckpt"), str(tmp_path / "c.sft")]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "c.ckpt"), str(tmp_path / "c.sft"), "--overwrite"]) == 0


def test_convert_refuses_unsafe_pickles_unless_asked(tmp_path, capsys):
    save_state({"obj": Custom(1), "w": torch.ones(1)}, tmp_path / "u.ckpt")
    assert main(["convert", str(tmp_path / "u.ckpt"), str(tmp_path / "u.sft")]) == 1
    err = capsys.readouterr().err
    assert "--unsafe" in err and not (tmp_path / "u.sft").exists()
    # with --unsafe it loads, but the object still cannot go into a .sft: a clear error naming it
    assert main(["convert", str(tmp_path / "u.ckpt"), str(tmp_path / "u.sft"), "--unsafe"]) == 1
    assert "['obj']" in capsys.readouterr().err and not (tmp_path / "u.sft").exists()


def test_convert_bad_suffix(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "a.ckpt"), str(tmp_path / "a.xyz")]) == 2
    assert "a.xyz" in capsys.readouterr().err


def test_console_entry_point_runs(tmp_path, ckpt):
    save_state(ckpt, tmp_path / "c.sft")
    proc = subprocess.run([sys.executable, "-m", "lightning_utils.cli", "inspect", str(tmp_path / "c.sft")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "state_dict: OrderedDict (2 items)" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "lightning_utils.cli"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "inspect" in proc.stdout
