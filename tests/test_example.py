"""The main example runs end to end (small settings) and its resume check passes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_codec_lm_example_resumes_exactly(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "train_codec_lm.py"), "--out", str(tmp_path), "--max-steps", "12",
           "--interrupt-at", "8", "--save-every", "4", "--items", "64", "--batch-size", "8", "--dim", "32", "--layers", "1",
           "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed losses equal the uninterrupted run's, step for step: True" in proc.stdout
    assert "resumed sample order equals the uninterrupted run's: True" in proc.stdout
    assert (tmp_path / "resumed" / "checkpoints" / "last.sft").is_file()
