"""Run the multi-process tests' scripts on this machine's gloo ranks, with a hard timeout.

* :func:`launch` starts a script once per rank (2 by default; LOCAL_RANK, WORLD_SIZE and
  MASTER_PORT in the environment), so Lightning does not re-launch the script, each rank's
  output is kept apart, and a rank that fails is seen as such instead of being killed by a
  launcher.
* :func:`run_launcher` starts one process whose Trainer starts its ranks itself.

A run that outlives its timeout is killed (its whole process group) and reported with its
output: a hang fails the test. A run that lost its free port to another process before binding
it is started once more. The repository comes first on PYTHONPATH.
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


ROOT = Path(__file__).resolve().parents[2]  # the repository: its package comes first on PYTHONPATH
_LAUNCH_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def _port_taken(text: str) -> bool:
    # a free port can be taken by another process before rank 0 binds it: then the run is retried
    return "address already in use" in text.lower()


def _base_env(env: dict[str, str] | None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in _LAUNCH_KEYS}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    base.update(PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    base.update(env or {})
    return base


def launch(
    script: Path, args: list[str], timeout: float = 240.0, world_size: int = 2, env: dict[str, str] | None = None
) -> list[RankResult]:
    """Run ``script args`` on ``world_size`` ranks (``env`` added to their environment); return each
    rank's exit code and output."""
    results = _launch_once(script, args, timeout, world_size, env)
    if any(r.returncode and _port_taken(r.output) for r in results):
        results = _launch_once(script, args, timeout, world_size, env)
    return results


def run_launcher(
    args: list[str], timeout: float = 240.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python *args``, a script whose Trainer starts its ranks itself (``devices=2``), with a
    free ``MASTER_PORT``; return its exit code and output. A run that outlives ``timeout`` is
    killed with every process it started, and fails the test with its output."""
    for _attempt in range(2):
        proc = subprocess.Popen(
            [sys.executable, *args],
            env={**_base_env(env), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: the ranks it starts die with it
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"{args[0]} did not finish within {timeout:.0f}s (hang):\n{err[-3000:]}") from None
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # ranks left behind by a failed run
        if proc.returncode == 0 or not _port_taken(err):
            break
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _launch_once(
    script: Path, args: list[str], timeout: float, world_size: int, env: dict[str, str] | None
) -> list[RankResult]:
    port = free_port()
    procs = []
    for rank in range(world_size):
        rank_env = {
            **_base_env(env),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
            "WORLD_SIZE": str(world_size),
        }
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
