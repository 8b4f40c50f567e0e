"""Checkpoint save/load speed and memory: ours (.sft) vs Lightning's TorchCheckpointIO vs torch.

    python benchmarks/checkpoint_io.py [--params 100e6] [--repeat 3] [--dir DIR]

Builds a Lightning-style checkpoint of a ~100M-parameter model with AdamW state (~1.2 GB of
tensors) and measures, in one run and on one filesystem:

* the physical limit: writing the checkpoint's own tensor bytes raw from memory, then ``fdatasync``;
* save time of ``save_state(..., ".sft")`` (fsync included), of Lightning's
  ``TorchCheckpointIO.save_checkpoint`` and of plain ``torch.save``;
* load time of each, with every byte of every tensor touched (a lazy mmap proves nothing);
* peak extra RSS during our save, sampled every millisecond.

Page cache is warm for every load (we cannot drop caches without privileges), the same for all.
Uses only the core dependencies (psutil is not needed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from peak_rss import PeakRSS  # benchmarks/peak_rss.py (the script's own folder is on sys.path)

from lightning_utils.io import load_state, save_state
from lightning_utils.io.atomic import write_all


def build_checkpoint(params: float) -> dict:
    width = 2048
    layers = max(1, round(params / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    for p in model.parameters():
        p.grad = None
    return {
        "epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.6.6", "state_dict": model.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1}}}},
        "callbacks": {}, "optimizer_states": [opt.state_dict()], "lr_schedulers": [],
        "hparams_name": "kwargs", "hyper_parameters": {"width": width, "layers": layers, "root": Path("/data")},
    }  # fmt: skip


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def touch_all(obj) -> float:
    """Read every byte of every tensor (a sum over 4-byte words), returns a checksum."""
    if isinstance(obj, torch.Tensor):
        if obj.numel() == 0:
            return 0.0
        flat = obj.detach().reshape(-1).view(torch.uint8)
        words = flat.view(torch.int32) if flat.numel() % 4 == 0 else flat
        return float(words.sum(dtype=torch.int64))
    if isinstance(obj, dict):
        return sum(touch_all(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(touch_all(v) for v in obj)
    return 0.0


def tensors_of(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_of(v)]
    return []


def raw_write(path: Path, tensors: list[torch.Tensor]) -> None:
    """The physical limit: the checkpoint's own tensor bytes, written straight out, then fdatasync.

    The same bytes as the checkpoint (not one buffer repeated, which a deduplicating or caching
    virtual disk would flatter), with no header, no temp file, no rename, no directory fsync.
    """
    if path.exists():
        path.unlink()  # a new file each time, as every checkpoint save makes
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for t in tensors:
            if t.numel():
                write_all(fd, memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()).cast("B"))
        os.fdatasync(fd)
    finally:
        os.close(fd)


def interleaved(fns: dict, repeat: int) -> dict:
    """Median time of each function, running them in turns within each repeat.

    Disk and page-cache state drift on a shared machine; taking turns spreads a slow phase over
    every method instead of charging it to whichever happened to run then. Note what this means
    for writers without fsync (Lightning's, torch.save): their time excludes the disk write the
    kernel does for them later; ours includes it.
    """
    times: dict = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            # Untimed: flush what the previous method left dirty. Writers that never fsync leave
            # their data to the kernel; without this, the next writer that does fsync would pay
            # for their writeback too.
            os.sync()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure_saves(params: float, workdir: Path, repeat: int) -> tuple[dict, int, int, float]:
    """Save times of each method, our save's peak extra RSS, the tensor bytes and a checksum.

    The checkpoint lives only in this function: it is freed before the loads are measured.
    """
    torch.manual_seed(0)
    ckpt = build_checkpoint(params)
    size = tensor_bytes(ckpt)
    print(f"checkpoint: {size / 1e9:.2f} GB of tensors, writing to {workdir}")
    io = TorchCheckpointIO()
    tensors = tensors_of(ckpt)
    saves = interleaved(
        {
            "raw": lambda: raw_write(workdir / "raw.bin", tensors),
            "ours": lambda: save_state(ckpt, workdir / "c.sft"),
            "lightning": lambda: io.save_checkpoint(ckpt, workdir / "c.ckpt"),
            # the same durability as ours: until the data is on disk
            "lightning_durable": lambda: (io.save_checkpoint(ckpt, workdir / "c2.ckpt"), os.sync()),
            "torch": lambda: torch.save(ckpt, workdir / "c.pt"),
        },
        repeat,
    )
    with PeakRSS() as peak:
        save_state(ckpt, workdir / "c.sft")
    return saves, peak.extra, size, touch_all(ckpt)


def measure_loads(workdir: Path, checksum: float, repeat: int) -> dict:
    """Load time of each method, every byte touched and checked against ``checksum``."""
    io = TorchCheckpointIO()
    loads = {
        "ours (.sft)": lambda: load_state(workdir / "c.sft"),
        "ours (.sft, mmap=False)": lambda: load_state(workdir / "c.sft", mmap=False),
        # weights_only=False: with the default (True) both refuse the pathlib.Path in the hparams
        "TorchCheckpointIO": lambda: io.load_checkpoint(workdir / "c.ckpt", weights_only=False),
        "torch.load": lambda: torch.load(workdir / "c.pt", weights_only=False),
    }

    def checked(load):
        def run():
            assert touch_all(load()) == checksum

        return run

    return interleaved({name: checked(load) for name, load in loads.items()}, repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=100e6, help="model parameters (default 100e6)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    ap.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir under the current directory)"
    )
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir or Path.cwd()))
    try:
        saves, peak_extra, size, checksum = measure_saves(args.params, workdir, args.repeat)
        results = measure_loads(workdir, checksum, args.repeat)
    finally:
        for p in workdir.iterdir():
            p.unlink()
        workdir.rmdir()
    t_raw, t_ours, t_lio, t_torch = saves["raw"], saves["ours"], saves["lightning"], saves["torch"]
    t_lio_durable = saves["lightning_durable"]

    print(f"\nsave (median of {args.repeat}, methods interleaved):")
    print(f"  raw write + fdatasync        {t_raw:7.2f} s   (physical limit)")
    print(f"  ours save_state(.sft)+fsync  {t_ours:7.2f} s   {t_ours / t_raw:5.2f}x raw   (target <= 1.3x)")
    print(f"  TorchCheckpointIO (no fsync) {t_lio:7.2f} s   {t_lio / t_ours:5.2f}x slower than ours (target >= 5x)")
    print(
        f"  TorchCheckpointIO + os.sync  {t_lio_durable:7.2f} s   {t_lio_durable / t_ours:5.2f}x slower than ours (same durability)"
    )
    print(f"  torch.save (no fsync)        {t_torch:7.2f} s   {t_torch / t_ours:5.2f}x slower than ours")
    print(f"\nload, every byte touched (median of {args.repeat}, methods interleaved):")
    ours = results["ours (.sft)"]
    for name, t in results.items():
        note = (
            ""
            if name == "ours (.sft)"
            else f"   {t / ours:5.2f}x slower than ours" + (" (target >= 2x)" if name == "TorchCheckpointIO" else "")
        )
        print(f"  {name:28s} {t:7.2f} s{note}")
    print(
        f"\npeak extra RSS during our save: {peak_extra / 1e6:.0f} MB = {peak_extra / size:.3f}x the checkpoint (target <= 0.5x)"
    )


if __name__ == "__main__":
    main()
