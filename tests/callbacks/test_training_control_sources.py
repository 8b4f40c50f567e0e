"""TrainingControl fed by its real sources in a real fit: a command file, and several fits
with stdin, FIFO and file sources in one process (no thread or file descriptor left behind)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from control_scripts.recording_module import RecordingModule
from helpers.lightning import cpu_trainer

from lightning_utils.callbacks.training_control import TrainingControl
from lightning_utils.control.sources import FileSource

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
    # In a fresh process: the descriptors and threads of the whole process are counted, and
    # other tests in this one leave pools and servers that open and close them at any time.
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "control_scripts" / "several_fits.py"), str(tmp_path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
