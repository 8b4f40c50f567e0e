"""TrainingControl in a real ``Trainer.fit`` subprocess: a pipe on stdin, /dev/null, no stdin."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from control_scripts.proc import Driven


def result(root: Path, rank: int = 0) -> dict:
    return json.loads((root / "out" / f"rank{rank}.json").read_text())


def test_pipe_drives_a_running_fit(tmp_path):
    run = Driven(["--root", str(tmp_path), "--max-steps", "400", "--sleep", "0.02", "--print-steps"])
    try:
        run.wait_for("STEP 2")
        run.send("lr 0.5\n   garbage  \n")
        run.wait_for("ignored bad command: 'garbage'")  # lines are stripped
        run.send("quit\n")
        out = run.finish(timeout=90)
    finally:
        run.kill()
    assert run.proc.returncode == 0, out
    assert "FIT RETURNED" in out and "Traceback" not in out
    res = result(tmp_path)
    steps_at_half = [s for s, lr in res["lr_trace"] if lr == 0.5]
    assert steps_at_half and steps_at_half[-1] == res["global_step"] < 400  # quit stopped it early
    assert all(lr == 0.1 for s, lr in res["lr_trace"] if s < steps_at_half[0])
    assert res["checkpoints"] == [f"step={res['global_step']}.ckpt"]  # save_on_quit


def test_dev_null_and_closed_stdin_finish_all_steps(tmp_path):
    # Both children run at once (each mostly spends its time importing Lightning).
    closed_ok = sys.platform != "win32"  # closing fd 0 before exec is POSIX-only
    with open(os.devnull) as devnull:
        null_run = Driven(["--root", str(tmp_path / "null"), "--max-steps", "8"], stdin=devnull)
    closed_run = (
        Driven(["--root", str(tmp_path / "closed"), "--max-steps", "5"], stdin=None, preexec_fn=lambda: os.close(0))
        if closed_ok
        else None
    )
    out = null_run.finish(timeout=90)
    assert null_run.proc.returncode == 0, out
    assert "FIT RETURNED 8" in out
    res = result(tmp_path / "null")
    assert res["global_step"] == 8 and res["checkpoints"] == ["step=8.ckpt"]  # the final save
    if closed_run is not None:
        out = closed_run.finish(timeout=90)
        assert closed_run.proc.returncode == 0, out
        assert "FIT RETURNED 5" in out and "Traceback" not in out


def test_stdin_lines_typed_before_training_act_before_the_first_step(tmp_path):
    # 'lr 0.5' applies before the first step; 'save' is ignored (nothing trained); 'quit' stops.
    run = Driven(["--root", str(tmp_path), "--max-steps", "50"], stdin=subprocess.PIPE)
    run.send("lr 0.5\nsave\nquit\n")
    run.proc.stdin.close()
    out = run.finish(timeout=90)
    assert run.proc.returncode == 0, out
    assert "'save' before the first step is ignored" in out
    res = result(tmp_path)
    assert res["global_step"] == 0 and res["checkpoints"] == []


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 does not exist on this platform")
def test_sigusr1_from_outside_saves_at_a_step_boundary_and_training_goes_on(tmp_path):
    run = Driven(["--root", str(tmp_path), "--max-steps", "400", "--sleep", "0.02", "--print-steps"])
    try:
        run.wait_for("STEP 3")
        run.proc.send_signal(signal.SIGUSR1)  # what `kill -USR1 <pid>` does
        saved = run.wait_for("saved checkpoint")
        step = int(saved.rsplit("step ", 1)[1].rstrip(")"))
        run.wait_for(f"STEP {step + 2}")  # the run goes on after the save
        run.send("quit\n")
        out = run.finish(timeout=90)
    finally:
        run.kill()
    assert run.proc.returncode == 0, out
    assert "received SIGUSR1" in out
    res = result(tmp_path)
    assert res["checkpoints"] == sorted([f"step={step}.ckpt", f"step={res['global_step']}.ckpt"])


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX-only")
def test_terminal_stdin(tmp_path):
    import pty

    master, slave = pty.openpty()
    try:
        run = Driven(["--root", str(tmp_path), "--max-steps", "400", "--sleep", "0.02", "--print-steps"], stdin=slave)
        os.close(slave)
        try:
            run.wait_for("STEP 2")
            os.write(master, b"lr 0.5\nquit\n")  # typed at the terminal
            out = run.finish(timeout=90)
        finally:
            run.kill()
    finally:
        os.close(master)
    assert run.proc.returncode == 0, out
    res = result(tmp_path)
    assert res["global_step"] < 400 and res["lr_trace"][-1][1] == 0.5
