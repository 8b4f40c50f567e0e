"""Resumable data position: ours (ResumableDataLoader + RandomSampler) vs torchdata's StatefulDataLoader.

    .venv/bin/pip install torchdata        # only for this benchmark; not a dependency
    python benchmarks/samplers.py [--sizes 1e6 1e8] [--batch-size 32] [--batches 3000]

In one run it prints:

* for each dataset size: the size of the loader state (``torch.save`` bytes) after a few
  batches, the time to save it, restore it into a new loader and get the first batch, and the
  peak extra RSS during that restore, for ours and for ``StatefulDataLoader(shuffle=True)``;
* the per-batch time of ``ResumableDataLoader`` vs a plain ``DataLoader`` over the same
  sampler (the loader's own overhead, goal <= 1.05x), and vs a plain ``DataLoader(shuffle=True)``
  with torch's ``RandomSampler`` (the whole cost of switching, sampler included).

Single process (num_workers=0) so the numbers measure the loaders, not worker start-up.
"""

from __future__ import annotations

import argparse
import gc
import io
import statistics
import time

import torch
from peak_rss import PeakRSS  # benchmarks/peak_rss.py (the script's own folder is on sys.path)
from torch.utils.data import DataLoader, Dataset

from lightning_utils.data.loader import ResumableDataLoader
from lightning_utils.data.samplers import RandomSampler


class IndexDataset(Dataset):
    """A map-style dataset of ``n`` items that returns the index (no data cost)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def state_roundtrip(make_loader, warmup_batches: int = 5) -> dict:
    """Consume a few batches, then time save -> bytes -> new loader -> load -> first batch."""
    reference = iter(make_loader())  # the uninterrupted run: what must come after the warm-up
    for _ in range(warmup_batches):
        next(reference)
    expected = next(reference)
    del reference
    loader = make_loader()
    it = iter(loader)
    for _ in range(warmup_batches):
        next(it)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        buf = io.BytesIO()
        torch.save(loader.state_dict(), buf)
        size = buf.tell()
        buf.seek(0)
        restored = make_loader()
        restored.load_state_dict(torch.load(buf, weights_only=False))
        first = next(iter(restored))
        elapsed = time.perf_counter() - t0
    assert torch.equal(torch.as_tensor(first), torch.as_tensor(expected)), "restore did not continue exactly"
    del it, loader, restored
    gc.collect()
    return {"bytes": size, "seconds": elapsed, "rss": mem.extra}


def _time_batches(make_loader, batches: int) -> float:
    loader = make_loader()
    it = iter(loader)
    next(it)  # exclude iterator start-up
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t0) / batches


def per_batch_seconds(makers: dict, batches: int, repeat: int = 7) -> dict:
    """Median per-batch time of each loader. The loaders take turns within every repeat, so a
    warm-up effect or a noisy neighbour on a shared machine hits them all alike (timing them one
    after the other made the first one look ~25% slower)."""
    for make in makers.values():
        _time_batches(make, min(batches, 200))  # warm-up: imports, allocator, caches
    times: dict = {name: [] for name in makers}
    for _ in range(repeat):
        for name, make in makers.items():
            times[name].append(_time_batches(make, batches))
    return {name: statistics.median(ts) for name, ts in times.items()}


def roundtrip_loaders(ds: Dataset, n: int, bs: int, stateful_loader: type) -> dict:
    """Builders of our loader and torchdata's over the ``n`` items of ``ds``, both shuffling."""
    return {
        "ours": lambda: ResumableDataLoader(ds, batch_size=bs, sampler=RandomSampler(n, seed=0)),
        "torchdata Stateful": lambda: stateful_loader(
            ds, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(0)
        ),
    }


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e8], help="dataset sizes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3000, help="batches timed for the per-batch overhead")
    args = parser.parse_args()
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        raise SystemExit("this benchmark compares against torchdata: .venv/bin/pip install torchdata") from None

    bs = args.batch_size
    print(f"torch {torch.__version__}, batch_size={bs}, num_workers=0\n")
    print("save + restore + first batch (state after 5 batches)")
    print(f"{'items':>12} {'loader':<22} {'state':>10} {'time':>10} {'peak extra RSS':>15}")
    for size in args.sizes:
        n = int(size)
        rows = roundtrip_loaders(IndexDataset(n), n, bs, StatefulDataLoader)
        results = {}
        for name, make in rows.items():
            r = results[name] = state_roundtrip(make)
            print(
                f"{n:>12.0e} {name:<22} {fmt_bytes(r['bytes']):>10} {r['seconds'] * 1e3:>8.2f}ms {fmt_bytes(r['rss']):>15}"
            )
        ours, theirs = results["ours"], results["torchdata Stateful"]
        print(
            f"{'':>12} {'ratio torchdata/ours':<22} {theirs['bytes'] / ours['bytes']:>9.1f}x "
            f"{theirs['seconds'] / ours['seconds']:>9.0f}x"
        )

    n = 1_000_000
    ds = IndexDataset(n)
    print(f"\nper-batch time over {args.batches} batches of {bs} ({n:.0e} items, median of 7, interleaved)")
    timed = per_batch_seconds(
        {
            "plain_same": lambda: DataLoader(ds, batch_size=bs, sampler=RandomSampler(n, seed=0)),
            "ours": lambda: ResumableDataLoader(ds, batch_size=bs, sampler=RandomSampler(n, seed=0)),
            "plain_torch": lambda: DataLoader(ds, batch_size=bs, shuffle=True),
            "stateful": lambda: StatefulDataLoader(
                ds, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(0)
            ),
        },
        args.batches,
    )
    plain_same, ours, plain_torch, stateful = (timed[k] for k in ("plain_same", "ours", "plain_torch", "stateful"))
    print(f"  DataLoader(sampler=our RandomSampler)      {plain_same * 1e6:8.1f} us")
    print(
        f"  ResumableDataLoader(our RandomSampler)     {ours * 1e6:8.1f} us   {ours / plain_same:.3f}x the plain loader (goal <= 1.05x)"
    )
    print(
        f"  DataLoader(shuffle=True), torch sampler    {plain_torch * 1e6:8.1f} us   ours is {ours / plain_torch:.3f}x"
    )
    print(f"  torchdata StatefulDataLoader(shuffle=True) {stateful * 1e6:8.1f} us   ours is {ours / stateful:.3f}x")


if __name__ == "__main__":
    main()
