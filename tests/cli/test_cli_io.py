"""``lightning-utils inspect`` and ``convert`` (:mod:`lightning_utils.cli.inspect`,
:mod:`lightning_utils.cli.convert`): output, exit codes, safety."""

from __future__ import annotations

import json
import pathlib
import struct
import subprocess
import sys

import pytest
import torch
from helpers.checkpoints import Custom, assert_same

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


def test_inspect_of_a_local_sft_reads_only_its_header(tmp_path, capsys, monkeypatch):
    """Every read of the file is counted (``open`` hands out counting files; ``mmap`` is refused):
    ``inspect`` reads the 8-byte length and the header, not one byte of the 4 MiB of tensor data."""
    import builtins
    import io
    import mmap

    path = tmp_path / "big.sft"
    save_state({"w": torch.ones(1 << 20), "step": 3}, path)
    with open(path, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
    data_start = 8 + header_length
    assert path.stat().st_size - data_start == 4 << 20
    reads: list[tuple[int, int]] = []  # (offset, bytes) of each read of the file

    class CountingFile(io.FileIO):
        def readinto(self, b):
            start = self.tell()
            n = super().readinto(b)
            reads.append((start, n or 0))
            return n

        def read(self, size=-1):
            start = self.tell()
            data = super().read(size)
            reads.append((start, len(data or b"")))
            return data

        def readall(self):
            return self.read()

    real_open = builtins.open

    def counting_open(file, mode="r", buffering=-1, *args, **kwargs):
        if isinstance(file, (str, pathlib.Path)) and pathlib.Path(file) == path:
            assert mode == "rb", mode
            raw = CountingFile(file, "rb")
            return raw if buffering == 0 else io.BufferedReader(raw)
        return real_open(file, mode, buffering, *args, **kwargs)

    def no_mmap(*args, **kwargs):
        raise AssertionError("inspect memory-mapped the file")

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(mmap, "mmap", no_mmap)
    assert main(["inspect", str(path)]) == 0
    assert "w: tensor float32 [1048576] 4.0 MiB" in capsys.readouterr().out
    assert reads and all(offset + n <= data_start for offset, n in reads), reads
    assert sum(n for _, n in reads) <= data_start
    # the counting is real: a load reads the data through the same files
    reads.clear()
    assert torch.equal(load_state(path, mmap=False)["w"], torch.ones(1 << 20))
    assert sum(n for offset, n in reads if offset >= data_start) >= 4 << 20


def test_inspect_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.sft")]) == 1
    assert "missing.sft" in capsys.readouterr().err
    (tmp_path / "junk.sft").write_bytes(b"not a checkpoint")
    assert main(["inspect", str(tmp_path / "junk.sft")]) == 1
    assert "junk.sft" in capsys.readouterr().err


def test_inspect_of_a_crafted_file_exits_1_with_a_message(tmp_path, capsys):
    """A header whose shape torch cannot represent makes ``inspect`` exit 1 with a message naming the file."""
    header = json.dumps({"x": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}).encode()
    header += b" " * (-len(header) % 8)
    p = tmp_path / "crafted.sft"
    p.write_bytes(struct.pack("<Q", len(header)) + header)
    assert main(["inspect", str(p)]) == 1
    assert "crafted.sft" in capsys.readouterr().err


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


def test_convert_to_ckpt_of_what_torch_cannot_pickle_exits_1(tmp_path, capsys):
    """One storage viewed as two dtypes (which a .sft keeps and ``torch.save`` refuses) makes
    ``convert`` to ``.ckpt`` exit 1 with a message naming the destination, and write nothing."""
    base = torch.arange(8, dtype=torch.int32)
    save_state({"i": base, "f": base.view(torch.float32)}, tmp_path / "mixed.sft")
    assert main(["convert", str(tmp_path / "mixed.sft"), str(tmp_path / "mixed.ckpt")]) == 1
    assert "mixed.ckpt" in capsys.readouterr().err
    assert not (tmp_path / "mixed.ckpt").exists()


def test_convert_onto_a_directory_exits_with_a_message(tmp_path, capsys):
    """``convert SRC DST --overwrite`` with DST an existing directory exits with a message naming it
    (any OSError from the write does), not a traceback."""
    save_state({"a": torch.ones(1)}, tmp_path / "src.ckpt")
    (tmp_path / "dst.sft").mkdir()
    assert main(["convert", str(tmp_path / "src.ckpt"), str(tmp_path / "dst.sft"), "--overwrite"]) in (1, 2)
    assert "dst.sft" in capsys.readouterr().err


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


def test_inspect_of_an_unsafe_pickle_names_its_own_unsafe_flag(tmp_path, capsys):
    save_state({"obj": Custom(1), "w": torch.ones(1)}, tmp_path / "u.ckpt")
    assert main(["inspect", str(tmp_path / "u.ckpt")]) == 1
    err = capsys.readouterr().err
    assert "u.ckpt" in err and "--unsafe" in err
    assert main(["inspect", str(tmp_path / "u.ckpt"), "--unsafe"]) == 0
    assert "obj: " in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--depth", "-1"], ["--max-items", "-2"]], ids=["depth", "max-items"])
def test_inspect_refuses_negative_limits_naming_the_argument(tmp_path, ckpt, capsys, args):
    save_state(ckpt, tmp_path / "c.sft")
    assert main(["inspect", str(tmp_path / "c.sft"), *args]) == 2
    captured = capsys.readouterr()
    assert args[0] in captured.err and captured.out == ""


def test_convert_of_an_old_ckpt_with_namespace_hparams(tmp_path, capsys):
    """Old Lightning checkpoints hold ``argparse.Namespace`` hyperparameters, which
    ``weights_only=True`` refuses: ``convert --unsafe`` writes a ``.sft`` that loads them back as a
    ``Namespace``, with no pickle in it."""
    import argparse

    args = argparse.Namespace(lr=0.1, layers=2, data=pathlib.PosixPath("/data"))
    old = {
        "state_dict": torch.nn.Linear(2, 2).state_dict(),
        "hyper_parameters": {"hparams": args, "hidden": 8},
        "hparams": args,  # where Lightning 0.7 put them
        "pytorch-lightning_version": "0.7.6",
    }
    save_state(old, tmp_path / "old.ckpt")
    assert main(["convert", str(tmp_path / "old.ckpt"), str(tmp_path / "old.sft")]) == 1
    assert "--unsafe" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "old.ckpt"), str(tmp_path / "old.sft"), "--unsafe"]) == 0
    out = load_state(tmp_path / "old.sft")
    assert_same(out, load_state(tmp_path / "old.ckpt", weights_only=False))
    assert type(out["hparams"]) is argparse.Namespace and out["hyper_parameters"]["hparams"] is not None
