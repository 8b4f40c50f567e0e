"""Several fits in one fresh process, with stdin, FIFO and file command sources: after each fit
the process holds exactly the threads and file descriptors it held before the first.

Run by tests/callbacks/test_training_control_sources.py in a process of its own, so that nothing
other tests left running (HTTP connection pools, servers) opens or closes descriptors meanwhile.

usage: several_fits.py TMP_DIR
"""

import os
import sys
import threading
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(TESTS), str(TESTS / "callbacks")]

from control_scripts.recording_module import RecordingModule  # noqa: E402 - needs the path above
from helpers.lightning import cpu_trainer  # noqa: E402

from lightning_utils.callbacks.training_control import TrainingControl  # noqa: E402
from lightning_utils.control.sources import FileSource, StdinSource  # noqa: E402


def fds() -> int:
    return len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))


def main() -> None:
    tmp_path = Path(sys.argv[1])
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
            now = (fds(), threading.active_count())
            assert now == baseline, (now, baseline, [t.name for t in threading.enumerate()])
    finally:
        os.close(r)
        os.close(w)
    print("ok")


if __name__ == "__main__":
    main()
