"""Start a script once per rank of a gloo job on this machine (2 ranks by default), with a hard timeout.

Both ranks are started by the test (LOCAL_RANK, WORLD_SIZE and MASTER_PORT in the environment),
so Lightning does not re-launch the script, each rank's output is kept apart, and a rank that
fails is seen as such instead of being killed by a launcher. A run that outlives the timeout is
killed (its whole process group) and reported with both ranks' output: a hang fails the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from helpers.ports import free_port


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str


def launch(
    script: Path, args: list[str], timeout: float = 240.0, world_size: int = 2, env: dict[str, str] | None = None
) -> list[RankResult]:
    """Run ``script args`` on ``world_size`` ranks (``env`` added to their environment); return each
    rank's exit code and output."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        rank_env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            LOCAL_RANK=str(rank),
            NODE_RANK="0",
            WORLD_SIZE=str(world_size),
            PYTHONWARNINGS="ignore",
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
            **(env or {}),
        )
        rank_env.pop("RANK", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), *args],
                env=rank_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + timeout
    outputs: list[str] = []
    try:
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                for p in procs:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGKILL)
                texts = [p.communicate()[0] for p in procs]
                joined = "\n".join(f"--- rank {r} ---\n{t[-3000:]}" for r, t in enumerate(texts))
                raise AssertionError(f"{script.name} did not finish within {timeout:.0f}s (hang):\n{joined}") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
    return [RankResult(rank, proc.returncode, text) for rank, (proc, text) in enumerate(zip(procs, outputs))]


def check_ok(results: list[RankResult]) -> None:
    for result in results:
        assert result.returncode == 0, f"rank {result.rank} failed:\n{result.output[-4000:]}"
