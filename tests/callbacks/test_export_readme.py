"""The README's "Exporting weights" code runs as written and prints what its comment says."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def section_code(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"### {title}\n")
    end = text.index("\n## ", start)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_readme_exporting_weights_code_runs_as_written(tmp_path):
    blocks = section_code("Exporting weights")
    assert len(blocks) == 1
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", blocks[0]],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    printed = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    commented = re.search(r"# (\[.*\])", blocks[0]).group(1)  # the listing the comment shows
    head, tail = commented.split(", ..., ")
    assert printed[:3] == ast.literal_eval(head + "]") and printed[-1:] == ast.literal_eval("[" + tail)
    shards = [n for n in printed if n.startswith("model-")]
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    assert not list(tmp_path.rglob("*.bin"))
