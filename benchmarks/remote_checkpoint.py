"""Checkpoint save/load on object storage: ours vs Lightning's TorchCheckpointIO vs s3fs's plain put/get.

    python benchmarks/remote_checkpoint.py [--params 100e6] [--repeat 3]

Starts moto's S3 server as a subprocess on 127.0.0.1 (a real S3 API over HTTP; its own process,
so it does not share the client's interpreter) and measures, in one run, against that server:

* save: ``SafetensorsCheckpointIO.save_checkpoint`` to ``s3://.../c.sft`` (ours: a streamed,
  parallel multipart upload), Lightning's ``TorchCheckpointIO.save_checkpoint`` to
  ``s3://.../c.ckpt`` (``torch.save`` into memory, then s3fs's ``pipe``), ours to a ``.ckpt``, and
  s3fs's plain ``put`` of a local file holding the same bytes as our ``.sft`` (the baseline);
* load: ``load_state`` of the ``.sft`` (header, then parallel ranged reads), Lightning's
  ``TorchCheckpointIO.load_checkpoint`` of its ``.ckpt``, and s3fs's plain ``get`` of the same bytes
  to a local file (the baseline; ``cat_file`` into memory shown as well); loads touch every byte;
* peak extra RSS of each save (peak minus RSS before) and of each load (peak minus RSS after,
  with the loaded checkpoint still held: the memory the load needed on top of its result).

Methods take turns within each repeat; medians are reported. Uses the test extra (moto[server],
s3fs); nothing is written outside a temp directory and the server's memory.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import fsspec.config
import torch
from checkpoint_io import build_checkpoint, tensor_bytes, touch_all  # benchmarks/ is on sys.path
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from peak_rss import PeakRSS, rss_bytes

from lightning_utils.io import load_state, save_state
from lightning_utils.plugins import SafetensorsCheckpointIO


def start_server() -> tuple[subprocess.Popen, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.environ.get("MOTO_LOG", os.devnull), "w")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto's server did not start")
    options = {
        "key": "bench",
        "secret": "bench",
        "endpoint_url": f"http://127.0.0.1:{port}",
        "client_kwargs": {"region_name": "us-east-1"},
        # moto assembles a completed multipart upload in Python: on a busy machine that can take
        # longer than botocore's default 60 s read timeout, and a retried completion then fails
        "config_kwargs": {"read_timeout": 600},
    }
    return proc, options


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS, so one method's peak is not hidden in the memory a
    previous method freed (glibc keeps it resident and reuses it without raising the RSS)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(fn) -> tuple[float, int, int, object]:
    """Seconds, peak RSS above the start, peak RSS above the end (the result still held), fn's result."""
    release_free_memory()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        end = rss_bytes()
    return seconds, peak.peak - peak.start, max(0, peak.peak - end), out


def interleaved(fns: dict, repeat: int, kind: str, check=None) -> tuple[dict, dict]:
    """Times and peak extra RSS of each function, run in turns within each repeat.

    Saves count the peak above the RSS before; loads (``check`` given) the peak above the RSS
    after, with the result still held: what the load needed on top of the checkpoint it returns.
    """
    times: dict = {name: [] for name in fns}
    rss: dict = {name: [] for name in fns}
    for r in range(repeat):
        for name, fn in fns.items():
            seconds, above_start, above_end, out = measure(fn)
            if check is not None and out is not None and not isinstance(out, bytes):
                check(out)
            del out
            extra = above_start if check is None else above_end
            times[name].append(seconds)
            rss[name].append(extra)
            print(f"  [{kind} {r + 1}/{repeat}] {name:43s} {seconds:7.2f} s  {extra / 1e6:7.0f} MB", flush=True)
    return times, rss


def measure_saves(fs, params: float, local: Path, repeat: int) -> tuple[dict, dict, int, float]:
    """The checkpoint lives only in this function: it is freed before the loads are measured."""
    ours_io, lightning_io = SafetensorsCheckpointIO(), TorchCheckpointIO()
    torch.manual_seed(0)
    ckpt = build_checkpoint(params)
    size = tensor_bytes(ckpt)
    save_state(ckpt, local)  # the same bytes our save uploads, for put
    print(f"checkpoint: {size / 1e9:.2f} GB of tensors ({local.stat().st_size / 1e9:.2f} GB as .sft)")
    saves = {
        "ours .sft (SafetensorsCheckpointIO)": lambda: ours_io.save_checkpoint(ckpt, "s3://bench/c.sft"),
        "Lightning TorchCheckpointIO .ckpt": lambda: lightning_io.save_checkpoint(ckpt, "s3://bench/c.ckpt"),
        "ours .ckpt (SafetensorsCheckpointIO)": lambda: ours_io.save_checkpoint(ckpt, "s3://bench/ours.ckpt"),
        "s3fs put of the same bytes": lambda: fs.put_file(str(local), "bench/put.sft"),
    }
    times, rss = interleaved(saves, repeat, "save")
    assert fs.size("bench/c.sft") == local.stat().st_size
    return times, rss, size, touch_all(ckpt)


def measure_loads(fs, checksum: float, got: Path, repeat: int) -> tuple[dict, dict]:
    lightning_io = TorchCheckpointIO()

    def check(out) -> None:
        assert touch_all(out) == checksum

    loads = {
        "ours .sft (load_state)": lambda: load_state("s3://bench/c.sft"),
        # weights_only=False: its default refuses the pathlib.Path in the hparams
        "Lightning TorchCheckpointIO .ckpt": lambda: lightning_io.load_checkpoint(
            "s3://bench/c.ckpt", weights_only=False
        ),
        "s3fs get of the same bytes (to a file)": lambda: fs.get_file("bench/put.sft", str(got)),
        "s3fs cat_file of the same bytes (to memory)": lambda: fs.cat_file("bench/put.sft"),
    }
    return interleaved(loads, repeat, "load", check)


def _report(times: dict, rss: dict, baseline: str, short: str, size: int) -> None:
    """One line per method: median time, ratio to ``baseline``'s median, median peak extra RSS."""
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        extra = statistics.median(rss[name])
        print(
            f"  {name:43s} {t:7.2f} s  {t / med[baseline]:5.2f}x {short}   "
            f"peak extra RSS {extra / 1e6:6.0f} MB = {extra / size:.3f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=100e6, help="model parameters (default 100e6)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    args = ap.parse_args()

    proc, options = start_server()
    fsspec.config.conf["s3"] = options  # Lightning's TorchCheckpointIO takes no storage options
    workdir = Path(tempfile.mkdtemp(prefix="remote-bench-"))
    print(f"moto S3 server at {options['endpoint_url']}, temp files in {workdir}")
    try:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        fs.call_s3("create_bucket", Bucket="bench")
        # warm up every client (botocore loads its service model on first use)
        save_state({"w": torch.ones(4)}, "s3://bench/warm.sft")
        load_state("s3://bench/warm.sft")
        save_times, save_rss, size, checksum = measure_saves(fs, args.params, workdir / "c.sft", args.repeat)
        load_times, load_rss = measure_loads(fs, checksum, workdir / "got.sft", args.repeat)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for p in workdir.iterdir():
            p.unlink()
        workdir.rmdir()

    print(f"\nsave to s3:// (median of {args.repeat}, methods interleaved; RSS: peak above the start)")
    _report(save_times, save_rss, "s3fs put of the same bytes", "put", size)
    print(f"\nload from s3:// (median of {args.repeat}, methods interleaved; RSS: peak above the end, result held)")
    _report(load_times, load_rss, "s3fs get of the same bytes (to a file)", "get", size)
    print("goals: ours save <= 1.2x put, ours load <= 1.2x get, peak extra RSS <= 0.1x the checkpoint")


if __name__ == "__main__":
    main()
