"""``lightning-utils plot``: reading metrics JSON lines, choosing series, drawing, clear errors."""

from __future__ import annotations

import argparse
import builtins
import json
import subprocess
import sys

import pytest

from lightning_utils.cli import plot


def parse(argv):
    parser = argparse.ArgumentParser()
    plot.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        json.dumps({"step": s, "epoch": 0, "loss": 3.0 / s, "loss_mean": 3.5 / s, "lr": 0.1}) for s in range(1, 21)
    ]
    lines.insert(3, "[training control] saved checkpoint x.ckpt")  # interleaved log output
    lines.insert(5, 'Training Metrics: {"step": 99, "loss": 0.01}')  # prose before the JSON object
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_and_select(metrics_file):
    records, skipped = plot.read_metrics(metrics_file)
    assert len(records) == 21 and skipped == 1
    series = plot.select_series(records)
    assert sorted(series) == ["loss", "loss_mean"]  # default: metrics named like loss
    xs, ys = series["loss"]
    assert xs[:3] == [1.0, 2.0, 3.0] and ys[0] == 3.0
    assert sorted(plot.select_series(records, ["lr"])) == ["lr"]
    with pytest.raises(KeyError, match="not found"):
        plot.select_series(records, ["nope"])


def test_run_writes_a_png(metrics_file, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional 'plot' extra")
    out = tmp_path / "figs" / "loss.png"
    assert plot.run(parse([str(metrics_file), "-o", str(out), "--logy", "--title", "run"])) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out
    two = tmp_path / "two.png"
    assert plot.run(parse([str(metrics_file), str(metrics_file), "-m", "lr", "-o", str(two)])) == 0
    assert two.stat().st_size > 0


def test_clear_errors(metrics_file, tmp_path, capsys):
    assert plot.run(parse([str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x.png")])) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert plot.run(parse([str(metrics_file), "-m", "nope", "-o", str(tmp_path / "x.png")])) == 2
    assert "not found" in capsys.readouterr().err
    assert plot.run(parse([str(metrics_file), "-o", str(metrics_file)])) == 2  # never overwrite the input
    assert "is one of the input files" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("not json\n")
    assert plot.run(parse([str(empty), "-o", str(tmp_path / "x.png")])) == 2


def test_missing_matplotlib_gives_install_hint(metrics_file, tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    out = tmp_path / "x.png"
    assert plot.run(parse([str(metrics_file), "-o", str(out)])) == 1
    assert "pip install 'lightning-utils[plot]'" in capsys.readouterr().err
    assert not out.exists()


def test_module_does_not_import_matplotlib():
    code = "import sys, lightning_utils.cli.plot; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_python_dash_m_entry_point(metrics_file, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional 'plot' extra")
    out = tmp_path / "cli.png"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_utils.cli.plot", str(metrics_file), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()


def test_reads_what_metrics_printer_writes(tmp_path):
    from helpers.lightning import cpu_trainer
    from helpers.models import TinyModule, loader

    from lightning_utils.callbacks.metrics_printer import MetricsPrinter

    path = tmp_path / "metrics.jsonl"
    cpu_trainer(tmp_path, [MetricsPrinter(path=path, window=4)], max_steps=6).fit(TinyModule(), loader())
    records, skipped = plot.read_metrics(path)
    series = plot.select_series(records)
    assert skipped == 0 and {"train_loss", "train_loss_mean"} <= set(series)
    assert series["train_loss"][0] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_unreadable_inputs_and_unwritable_outputs_are_clear_errors(metrics_file, tmp_path, capsys):
    # a folder, an undecodable/binary file, an output the image backend refuses: exit code 2 and
    # a message naming the file, never a traceback
    assert plot.run(parse([str(tmp_path), "-o", str(tmp_path / "x.png")])) == 2
    assert str(tmp_path) in capsys.readouterr().err
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(bytes(range(256)) * 8)
    assert plot.run(parse([str(binary), "-o", str(tmp_path / "x.png")])) == 2
    assert "blob.jsonl" in capsys.readouterr().err
    pytest.importorskip("matplotlib", reason="matplotlib is the optional 'plot' extra")
    assert plot.run(parse([str(metrics_file), "-o", str(tmp_path / "loss.nosuchformat")])) == 2
    assert "loss.nosuchformat" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert plot.run(parse([str(metrics_file), "-o", str(blocker / "loss.png")])) == 2  # parent is a file
    assert "loss.png" in capsys.readouterr().err
