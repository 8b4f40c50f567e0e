"""Command sources: stdin (pipe, TTY, /dev/null, closed), command file, FIFO, signal flag.

A fit driven by a command file, and several fits in one process, are in
tests/callbacks/test_training_control_sources.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from lightning_utils.control.sources import FileSource, SignalFlag, StdinSource, resolve_source

REPO = Path(__file__).resolve().parents[2]
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file descriptors, FIFOs and ptys")


def poll_until(source, n: int, timeout: float = 5.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += source.poll()
        time.sleep(0.01)
    return got


def cpu_while_idle(seconds: float = 0.4) -> float:
    start = time.process_time()
    time.sleep(seconds)
    return time.process_time() - start


@posix_only
def test_stdin_source_reads_a_pipe_and_stops_at_eof():
    r, w = os.pipe()
    source = StdinSource(fd=r)
    source.start()
    try:
        os.write(w, b"save\n  lr 0.5 \n\nexp")
        assert poll_until(source, 2) == ["save", "lr 0.5"]
        assert source.poll() == []  # 'exp' has no newline yet
        assert cpu_while_idle() < 0.1  # the reader sleeps; it does not spin
        os.write(w, b"ort\nquit")
        os.close(w)  # EOF: the last line counts without its newline
        assert poll_until(source, 2) == ["export", "quit"]
        deadline = time.monotonic() + 5
        while source.is_reading and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not source.is_reading
    finally:
        source.close()
        os.close(r)


@posix_only
def test_stdin_source_close_wakes_a_waiting_reader():
    r, w = os.pipe()
    source = StdinSource(fd=r)
    source.start()
    assert source.is_reading
    t0 = time.monotonic()
    source.close()
    assert time.monotonic() - t0 < 1.0 and not source.is_reading
    os.close(r)
    os.close(w)


@posix_only
def test_stdin_source_reads_a_tty():
    master, slave = os.openpty()
    source = StdinSource(fd=slave)
    source.start()
    try:
        os.write(master, b"eval\n")
        assert poll_until(source, 1) == ["eval"]
    finally:
        source.close()
        os.close(master)
        os.close(slave)


def test_stdin_source_dev_null_and_closed_and_absent(monkeypatch):
    with open(os.devnull, "rb") as devnull:
        source = StdinSource(fd=devnull.fileno())
        source.start()
        time.sleep(0.1)
        assert source.poll() == [] and not source.is_reading
        source.close()
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    closed = StdinSource(fd=r)
    closed.start()
    assert not closed.is_reading and closed.poll() == []
    closed.close()
    monkeypatch.setattr(sys, "stdin", None)
    absent = StdinSource()
    absent.start()
    assert absent.poll() == [] and not absent.is_reading
    absent.close()


def test_stdin_source_with_pytest_captured_stdin():
    source = StdinSource()  # pytest replaces sys.stdin with an object without a usable fileno
    source.start()
    assert source.poll() == []
    source.close()


def test_command_file_tail_semantics(tmp_path):
    path = tmp_path / "commands.txt"
    path.write_text("quit\n")  # from an earlier run: must not be replayed
    source = FileSource(path, poll_interval=0.02)
    source.start()
    try:
        time.sleep(0.1)
        assert source.poll() == []
        with open(path, "a") as f:
            f.write("save\nlr 0.")
            f.flush()
            assert poll_until(source, 1) == ["save"]
            f.write("5\n")
        assert poll_until(source, 1) == ["lr 0.5"]
        path.write_text("eval\n")  # truncated and rewritten: read from the start
        assert poll_until(source, 1) == ["eval"]
        path.unlink()
        time.sleep(0.1)
        path.write_text("export\n")  # a new file: read from the start
        assert poll_until(source, 1) == ["export"]
    finally:
        source.close()


def test_command_file_created_after_start(tmp_path):
    path = tmp_path / "later.txt"
    source = resolve_source(str(path))
    assert isinstance(source, FileSource)
    source.poll_interval = 0.02
    source.start()
    try:
        path.write_text("save\n")
        assert poll_until(source, 1) == ["save"]
    finally:
        source.close()


@posix_only
def test_fifo_source_reads_every_writer_without_spinning(tmp_path):
    fifo = tmp_path / "control.fifo"
    os.mkfifo(fifo)
    source = FileSource(fifo)
    source.start()
    try:
        for text in (b"save\n", b"quit\n"):  # two writers, one after the other
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, text)
            os.close(fd)
        assert poll_until(source, 2) == ["save", "quit"]
        assert cpu_while_idle() < 0.1  # no writer: no EOF busy loop
    finally:
        source.close()


def test_source_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        FileSource(tmp_path)
    with pytest.raises(ValueError, match="poll_interval"):
        FileSource(tmp_path / "x", poll_interval=0)
    with pytest.raises(ValueError, match="source must be"):
        resolve_source("  ")
    assert isinstance(resolve_source("stdin"), StdinSource) and isinstance(resolve_source("-"), StdinSource)
    assert resolve_source(None) is None


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 does not exist on this platform")
def test_signal_flag(caplog):
    before = signal.getsignal(signal.SIGUSR1)
    flag = SignalFlag("usr1")
    assert flag.name == "SIGUSR1"
    assert flag.install()
    try:
        assert not flag.consume()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert flag.consume() and not flag.consume()
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before
    other = SignalFlag(signal.SIGUSR2)
    result = []
    with caplog.at_level(logging.WARNING):
        t = threading.Thread(target=lambda: result.append(other.install()))
        t.start()
        t.join()
    assert result == [False] and "not in the main thread" in caplog.text
    with pytest.raises(ValueError, match="does not exist"):
        SignalFlag("SIGNOPE")


@posix_only
def test_lines_already_waiting_are_read_at_start():
    r, w = os.pipe()
    os.write(w, b"eval_quit\n")
    os.close(w)
    source = StdinSource(fd=r)
    source.start()  # synchronously: no race with the reader thread for pre-loop commands
    assert source.poll() == ["eval_quit"] and not source.is_reading
    source.close()
    os.close(r)
    with open("/dev/zero", "rb") as zero:  # an endless input does not stall the start
        t0 = time.monotonic()
        endless = StdinSource(fd=zero.fileno())
        endless.start()
        endless.close()
        assert time.monotonic() - t0 < 5


_BACKGROUND_JOB = r"""
import os, subprocess, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)  # a session leader opening a terminal: it becomes the controlling one
os.dup2(fd, 0)
assert os.tcgetpgrp(0) == os.getpgrp()
reader = r'''
import os, sys, time
from lightning_utils.control.sources import StdinSource
source = StdinSource()
source.start()
print("READER background=%s" % (os.tcgetpgrp(0) != os.getpgrp()), flush=True)
got, deadline = [], time.monotonic() + 8
while not got and time.monotonic() < deadline:
    got = source.poll()
    time.sleep(0.02)
source.close()
print("READER got %r background=%s" % (got, os.tcgetpgrp(0) != os.getpgrp()), flush=True)
'''
job = subprocess.Popen([sys.executable, "-c", reader], stdin=0, process_group=0)  # like `python train.py &`
time.sleep(float(sys.argv[2]))  # the line typed meanwhile must stay unread, and the job running
os.tcsetpgrp(0, job.pid)  # `fg`
try:
    print("JOB rc=%s" % job.wait(timeout=8), flush=True)
except subprocess.TimeoutExpired:
    print("JOB STOPPED (read the terminal from the background)", flush=True)
    os.killpg(job.pid, 9)
"""


@pytest.mark.skipif(sys.platform == "win32" or sys.version_info < (3, 11), reason="POSIX job control; process_group")
def test_background_job_on_a_terminal_waits_for_the_foreground_instead_of_stopping(tmp_path):
    import subprocess

    master, slave = os.openpty()
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", _BACKGROUND_JOB, os.ttyname(slave), "1.0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            cwd=REPO,
        )
        time.sleep(0.6)
        os.write(master, b"save\n")  # typed while the job is in the background
        out, _ = child.communicate(timeout=30)
    finally:
        os.close(master)
        os.close(slave)
    assert "READER background=True" in out, out
    assert "READER got ['save'] background=False" in out, out  # read only once in the foreground
    assert "JOB rc=0" in out, out


def test_command_file_saved_by_an_editor_does_not_replay_old_lines(tmp_path):
    # Editors save by writing a new file and renaming it over the old one: the lines already
    # read are still at its start and must not run again (an old 'quit' would end the run).
    path = tmp_path / "commands.txt"
    source = FileSource(path, poll_interval=0.02)
    source.start()
    try:
        path.write_text("save\n")
        assert poll_until(source, 1) == ["save"]
        replacement = tmp_path / "commands.txt.swp"
        replacement.write_text("save\nquit\n")
        os.replace(replacement, path)  # a new inode holding the old lines plus a new one
        assert poll_until(source, 1) == ["quit"]
        time.sleep(0.1)
        assert source.poll() == []
        replacement.write_text("eval\n")  # different content: a new file, read from its start
        os.replace(replacement, path)
        assert poll_until(source, 1) == ["eval"]
    finally:
        source.close()


@posix_only
def test_interpreter_exits_cleanly_with_readers_still_waiting(tmp_path):
    # A script that never closes its sources (crashed before teardown, or sys.exit in a hook):
    # the daemon readers parked in poll() must neither hang the exit nor print a traceback.
    import subprocess

    fifo = tmp_path / "control.fifo"
    os.mkfifo(fifo)
    code = (
        "import sys; from lightning_utils.control.sources import StdinSource, FileSource; "
        "s = StdinSource(); s.start(); f = FileSource(sys.argv[1]); f.start(); "
        "print(s.is_reading, f.is_reading, flush=True)"
    )
    r, w = os.pipe()  # stdin that stays open, with no data
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(fifo)],
            stdin=r,
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
            cwd=REPO,
        )
    finally:
        os.close(r)
        os.close(w)
    assert proc.returncode == 0 and proc.stdout.strip() == "True True" and proc.stderr == "", proc
