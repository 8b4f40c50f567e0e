"""Weight export speed and memory: ExportWeights vs transformers' save_pretrained, in one process and under FSDP2.

    python benchmarks/export.py [--layers 8] [--width 1024] [--vocab 8192] [--repeat 3] [--ranks 1|2]

A GPT-2 (``GPT2LMHeadModel`` built from a config, ~110M parameters by default) is exported as a
Hugging Face directory that ``from_pretrained`` loads, in fp32 and in bf16, by:

* **ours**: ``ExportWeights.export`` (the weights gathered and written one tensor at a time);
* **save_pretrained**: ``model.save_pretrained(dir)`` for fp32, and for bf16
  ``save_pretrained(dir, state_dict={k: v.to(bfloat16)})`` (the model itself left in fp32, as
  during training).

``--ranks 2`` runs the same on 2 gloo ranks with every block and the model ``fully_shard``-ed
(FSDP2): ours gathers to rank 0 tensor by tensor; the alternative is what a training script
does with transformers, ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` and then
``save_pretrained(state_dict=...)`` on rank 0. Methods alternate within each repeat; each figure
is the median. Peak extra RSS is sampled every millisecond on rank 0 (``benchmarks/peak_rss.py``),
with glibc's mmap threshold fixed (the script re-runs itself with ``MALLOC_MMAP_THRESHOLD_``) so
that freed buffers leave RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from peak_rss import PeakRSS  # benchmarks/peak_rss.py (the script's own folder is on sys.path)

from lightning_utils.callbacks import ExportWeights

MB = 1 << 20


class Holder(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model


def build(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=args.vocab, n_positions=512, n_embd=args.width, n_layer=args.layers, n_head=args.width // 64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def ours(holder: Holder, out: Path, dtype: str, rank: int) -> None:
    trainer = SimpleNamespace(
        global_step=1, current_epoch=0, is_global_zero=rank == 0, default_root_dir=str(out),
        strategy=SimpleNamespace(), callback_metrics={}, lightning_module=holder,
    )  # fmt: skip
    ExportWeights(dirpath=out, dtype=dtype).export(trainer, holder, state_dict=holder.state_dict())


def alternative(holder: Holder, out: Path, dtype: str, rank: int) -> None:
    model = holder.model
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if rank == 0:
        if dtype == "bf16":
            state = {k: v.to(torch.bfloat16) for k, v in state.items()}
        model.save_pretrained(out / "weights", state_dict=state)
    del state
    if dist.is_initialized():
        dist.barrier()


def trim() -> None:
    """Hand freed heap memory back to the OS, so that RSS shows what is alive."""
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(fn, holder, root: Path, dtype: str, rank: int) -> tuple[float, int]:
    out = root / f"{fn.__name__}-{dtype}"
    trim()
    if dist.is_initialized():
        dist.barrier()
    with PeakRSS() as peak:
        start = time.perf_counter()
        fn(holder, out, dtype, rank)
        if rank == 0:
            os.sync()
        elapsed = time.perf_counter() - start
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
    return elapsed, peak.extra


def run(args: argparse.Namespace) -> None:
    rank = 0
    model = build(args)
    if args.ranks > 1:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (args.ranks,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    holder = Holder(model)
    sizes = {k: v.numel() * 4 for k, v in build(args).state_dict().items()} if rank == 0 else {}
    results: dict[tuple[str, str], list[tuple[float, int]]] = {}
    root = Path(tempfile.mkdtemp(prefix="export-bench-", dir=args.dir))
    try:
        for fn in (ours, alternative):  # warm-up: lazy imports and first-touch costs, not timed
            measure(fn, holder, root, "bf16", rank)
        for _ in range(args.repeat):
            for dtype in ("fp32", "bf16"):
                for fn in (ours, alternative):
                    results.setdefault((fn.__name__, dtype), []).append(measure(fn, holder, root, dtype, rank))
    finally:
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    if rank == 0:
        total = sum(sizes.values())
        print(f"GPT-2 {args.layers} layers x {args.width}, vocab {args.vocab}: {total / 4 / 1e6:.0f}M parameters, "
              f"{total / MB:.0f} MB in fp32, largest tensor {max(sizes.values()) / MB:.0f} MB; "
              f"{args.ranks} rank(s), median of {args.repeat}")  # fmt: skip
        largest = max(sizes.values())
        print("| dtype | method | time | time / ours | peak extra RSS, rank 0 | / largest fp32 tensor | / fp32 model |")
        print("|---|---|---|---|---|---|---|")
        for dtype in ("fp32", "bf16"):
            med = {m: (statistics.median(t for t, _ in results[(m, dtype)]),
                       statistics.median(r for _, r in results[(m, dtype)])) for m in ("ours", "alternative")}  # fmt: skip
            for m in ("ours", "alternative"):
                t, r = med[m]
                name = "**ours**: `ExportWeights.export`" if m == "ours" else (
                    "`get_model_state_dict(full)` + `save_pretrained`" if args.ranks > 1 else "`save_pretrained`")  # fmt: skip
                print(f"| {dtype} | {name} | {t:.2f} s | {t / med['ours'][0]:.2f}x | {r / MB:.0f} MB "
                      f"| {r / largest:.2f} | {r / total:.2f} |")  # fmt: skip
    if args.ranks > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=1, choices=(1, 2))
    parser.add_argument("--dir", default=None, help="where to write (default: the temp folder)")
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # glibc keeps freed large blocks in its heap once its mmap threshold has grown, so RSS
        # would not fall when a copy is freed nor rise when the next one reuses the space: a
        # fixed threshold makes every large buffer an mmap of its own, returned when freed.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))
    if args.ranks > 1 and "RANK" not in os.environ:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29517"),
               "WORLD_SIZE": str(args.ranks), "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs = [subprocess.Popen([sys.executable, *sys.argv], env={**env, "RANK": str(r)}) for r in range(args.ranks)]
        sys.exit(max(p.wait() for p in procs))
    run(args)


if __name__ == "__main__":
    main()
