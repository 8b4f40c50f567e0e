"""TrainingControl fed by its real sources in a real fit: a command file, and several fits
with stdin, FIFO and file sources in one process (no thread or file descriptor left behind)."""

from __future__ import annotations

import os
import sys
import threading

import pytest
from control_scripts.recording_module import RecordingModule
from helpers.lightning import cpu_trainer

from lightning_utils.callbacks.training_control import TrainingControl
from lightning_utils.control.sources import FileSource, StdinSource

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file descriptors and FIFOs")


def test_fit_driven_by_a_command_file(tmp_path):
    path = tmp_path / "commands.txt"

    class Writes(RecordingModule):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            super().on_train_batch_end(outputs, batch, batch_idx)
            if self.trainer.global_step == 2:
                with open(path, "a") as f:  # what `echo ... >> commands.txt` does
                    f.write("lr 0.25\nsave\nquit\n")

    source = FileSource(path, poll_interval=0.02)
    control = TrainingControl(source=source, signal=None)
    model = Writes(sleep=0.01)
    trainer = cpu_trainer(tmp_path, [control], max_steps=300)
    trainer.fit(model)
    stop = trainer.global_step
    assert 2 < stop < 300
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [f"step={stop}.ckpt"]
    assert model.lr_trace[-1] == (stop, 0.25)
    assert not source.is_reading  # closed at teardown


@posix_only
def test_several_fits_in_one_process_leak_no_threads_or_fds(tmp_path):
    def fds():
        # Sockets are left out: the sources open only pipes, FIFOs and files, while the HTTP
        # connection pools of earlier tests in this process (s3fs) close idle sockets at any time.
        folder = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
        kinds = []
        for name in os.listdir(folder):
            try:
                kinds.append(os.readlink(os.path.join(folder, name)))
            except OSError:  # closed since the listing (the listing's own descriptor), or /dev/fd
                kinds.append("" if folder == "/dev/fd" else None)
        return sum(1 for k in kinds if k is not None and not k.startswith("socket:"))

    r, w = os.pipe()  # an open, idle stdin
    fifo = tmp_path / "control.fifo"
    os.mkfifo(fifo)
    try:
        baseline = (fds(), threading.active_count())
        stdin = StdinSource(fd=r)
        for source in (stdin, FileSource(fifo), FileSource(tmp_path / "cmds.txt", poll_interval=0.05), stdin):
            control = TrainingControl(source=source)
            trainer = cpu_trainer(tmp_path, [control], max_steps=2)
            trainer.fit(RecordingModule())
            assert trainer.global_step == 2 and (tmp_path / "checkpoints" / "step=2.ckpt").is_file()
            assert (fds(), threading.active_count()) == baseline, [t.name for t in threading.enumerate()]
    finally:
        os.close(r)
        os.close(w)
