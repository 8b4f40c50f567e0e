"""Sharded checkpoints under FSDP2 on 2 gloo ranks: ours (.sft directory) vs Lightning's DCP, interleaved.

    python benchmarks/sharded_checkpoint.py [--params 200e6] [--repeat 5] [--dir DIR]

Starts 2 ranks on CPU (gloo). Each builds a model of ``--params`` parameters (N × Linear(4096,
4096)), shards it with ``fully_shard`` under ``lightning_utils.strategies.ModelParallelStrategy``,
trains one step so AdamW has its moments (about 12 bytes per parameter in all), and then, at the
end of training, measures with the methods taking turns within each repeat (each method first,
middle and last in turn); it reports the median time, and the median over repeats of each
repeat's ratio, which the disk's drift over minutes affects least:

* save: the raw write of each rank's own shard bytes + ``fdatasync`` (the physical limit); our
  ``trainer.save_checkpoint("x.sft")`` (a sharded directory, every file and directory fsynced);
  Lightning's own distributed save (``trainer.save_checkpoint("x.ckpt")``, the same strategy
  falls back to Lightning's code: ``torch.distributed.checkpoint`` files + ``meta.pt``), plus an
  fsync of ``meta.pt`` and the directory, so both are equally durable (DCP fsyncs its other files);
* load: ``strategy.load_checkpoint`` of each (model and optimizer states restored into the
  shards; the page cache is warm for both, we cannot drop it without privileges);
* async: the time ``trainer.save_checkpoint`` blocks with ``AsyncCheckpointIO`` against a plain
  copy (``clone``) of the rank's local shards;
* peak extra RSS of each rank during our save and during Lightning's, sampled every millisecond.

Every save writes a new checkpoint, and the same method's previous one is deleted (untimed) before
it; an untimed ``os.sync()`` precedes each timed method so no method pays for another's writeback.
Times are rank 0's, which waits for every rank at the end of each method.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

WIDTH = 4096


def launch(args: argparse.Namespace) -> int:
    """Start the 2 ranks (this script with --rank) and wait for them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = Path(tempfile.mkdtemp(prefix="sharded-bench-", dir=args.dir or Path.cwd()))
    procs = []
    try:
        for rank in range(2):
            env = dict(
                os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                WORLD_SIZE="2", PYTHONWARNINGS="ignore",
            )  # fmt: skip
            cmd = [sys.executable, __file__, "--rank", str(rank), "--params", str(args.params)]
            cmd += ["--repeat", str(args.repeat), "--dir", str(workdir)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=None if rank == 0 else subprocess.DEVNULL))
        return max(p.wait() for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def run_rank(args: argparse.Namespace) -> None:
    import logging

    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist
    from peak_rss import PeakRSS  # benchmarks/peak_rss.py (the script's own folder is on sys.path)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lightning_utils.io.atomic import fsync_directory, write_all
    from lightning_utils.plugins import AsyncCheckpointIO, SafetensorsCheckpointIO
    from lightning_utils.strategies import ModelParallelStrategy

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    workdir = Path(args.dir)
    layers = max(1, round(args.params / (WIDTH * WIDTH)))

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])

        def configure_model(self) -> None:
            for layer in self.net:
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

        def training_step(self, batch, batch_idx):
            return self.net(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-6)

    def local_tensors(trainer: pl.Trainer) -> list[torch.Tensor]:
        """This rank's blocks of the parameters and of the optimizer moments."""
        out = [p.to_local() for p in trainer.lightning_module.parameters()]
        for state in trainer.optimizers[0].state.values():
            out += [v.to_local() for v in state.values() if isinstance(v, DTensor)]
        return out

    def synced(fn, clear=None):
        """Run ``fn`` on every rank, starting together after the untimed ``clear`` (on rank 0) and an
        untimed os.sync; rank 0's wall time."""
        if dist.get_rank() == 0:
            if clear is not None:
                clear()
            os.sync()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    def remove(path: Path) -> None:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    class Measure(pl.Callback):
        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            rank, strategy = trainer.global_rank, trainer.strategy
            mine = local_tensors(trainer)
            shard_bytes = sum(t.numel() * t.element_size() for t in mine)
            # Every save writes a new checkpoint (as every_n_train_steps does), and the same method's
            # previous one is deleted, untimed, before it: no method pays for deleting or overwriting
            # its last output, and each starts with the same page cache.
            out = {name: [workdir / f"{name}-{i}{suffix}" for i in range(args.repeat)]
                   for name, suffix in (("raw", ""), ("ours", ".sft"), ("dcp", ".ckpt"), ("async", ".sft"))}  # fmt: skip

            def raw_write(i: int) -> None:
                out["raw"][i].mkdir(exist_ok=True)
                fd = os.open(out["raw"][i] / f"rank{rank}.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    for t in mine:
                        write_all(fd, memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()).cast("B"))
                    os.fdatasync(fd)
                finally:
                    os.close(fd)

            def dcp_save(path: Path) -> None:
                trainer.save_checkpoint(path)
                if rank == 0:  # DCP fsyncs its shard files and .metadata; Lightning's meta.pt it does not
                    with open(path / "meta.pt", "rb") as f:
                        os.fsync(f.fileno())
                    fsync_directory(path)
                    fsync_directory(workdir)

            plain = SafetensorsCheckpointIO()

            def plain_copy() -> None:
                copies = [t.clone() for t in mine]
                del copies

            times: dict[str, list[float]] = {
                k: [] for k in ("raw", "ours", "dcp", "ours_load", "dcp_load", "stall", "copy")
            }
            for i in range(args.repeat):
                previous = {name: paths[i - 1] if i else None for name, paths in out.items()}

                def clear(name: str, previous: dict = previous):
                    return (lambda: remove(previous[name])) if previous[name] is not None else None

                saves = [
                    ("raw", lambda i=i: raw_write(i)),
                    ("ours", lambda i=i: trainer.save_checkpoint(out["ours"][i])),
                    ("dcp", lambda i=i: dcp_save(out["dcp"][i])),
                ]
                for name, fn in saves[i % 3 :] + saves[: i % 3]:  # each method first, middle and last in turn
                    times[name].append(synced(fn, clear(name)))
                loads = [
                    ("ours_load", lambda i=i: strategy.load_checkpoint(out["ours"][i])),
                    ("dcp_load", lambda i=i: strategy.load_checkpoint(out["dcp"][i], weights_only=False)),
                ]
                for name, fn in loads if i % 2 == 0 else loads[::-1]:
                    times[name].append(synced(fn))
                strategy.checkpoint_io = AsyncCheckpointIO(plain)
                stall = synced(lambda i=i: trainer.save_checkpoint(out["async"][i]), clear("async"))
                times["stall"].append(stall)
                strategy.checkpoint_io.teardown()  # untimed: the write itself, on the worker thread
                strategy.checkpoint_io = plain
                times["copy"].append(synced(plain_copy))
            ours, dcp = workdir / "ours-rss.sft", workdir / "dcp-rss.ckpt"
            dist.barrier()
            with PeakRSS() as ours_rss:
                trainer.save_checkpoint(ours)
            with PeakRSS() as dcp_rss:
                dcp_save(dcp)
            peaks = [None, None]
            dist.all_gather_object(peaks, (shard_bytes, ours_rss.extra, dcp_rss.extra))
            if rank == 0:
                report(args, layers, times, peaks)

    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        plugins=[SafetensorsCheckpointIO()], max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Measure()],
    )  # fmt: skip
    data = torch.utils.data.DataLoader(torch.randn(4, WIDTH), batch_size=2)
    trainer.fit(Model(), data)
    dist.barrier()
    dist.destroy_process_group()


def report(args: argparse.Namespace, layers: int, times: dict[str, list[float]], peaks: list) -> None:
    m = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a: str, b: str) -> float:
        """The median over repeats of a/b, each pair measured minutes apart at most (robust to the disk's drift)."""
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    params = layers * WIDTH * WIDTH
    print(f"\n{params / 1e6:.0f}M parameters + AdamW moments on 2 gloo ranks: {12 * params / 1e9:.2f} GB of tensors")
    print(f"(median of {args.repeat}, methods interleaved; each rank's shard: {peaks[0][0] / 1e9:.2f} GB)\n")
    rows = [
        ("raw write of each rank's shard bytes + fdatasync", "raw", ""),
        ("ours: sharded .sft save (fsync of every file and dir)", "ours", f"{ratio('ours', 'raw'):.2f}x raw (<= 1.3x), {ratio('ours', 'dcp'):.2f}x DCP (<= 1.0x)"),
        ("Lightning DCP save + fsync of meta.pt and dir", "dcp", f"{ratio('dcp', 'raw'):.2f}x raw"),
        ("ours: load (reshards: each rank reads its slices)", "ours_load", f"{ratio('ours_load', 'dcp_load'):.2f}x DCP (<= 1.0x)"),
        ("Lightning DCP load", "dcp_load", ""),
        ("ours: AsyncCheckpointIO stall (trainer.save_checkpoint)", "stall", f"{ratio('stall', 'copy'):.2f}x copy (<= 1.5x)"),
        ("plain copy (clone) of the rank's local shards", "copy", ""),
    ]  # fmt: skip
    print("  ratios: the median over repeats of the ratio within each repeat")
    for name, key, note in rows:
        each = " ".join(f"{t:.2f}" for t in times[key])
        print(f"  {name:58s} {m[key]:7.2f} s   {note}   [{each}]")
    for rank, (shard, ours_extra, dcp_extra) in enumerate(peaks):
        print(
            f"  rank {rank}: peak extra RSS during our save {ours_extra / 1e6:7.1f} MB = {ours_extra / shard:.3f}x its shard "
            f"(<= 0.1x); during Lightning's {dcp_extra / 1e6:7.1f} MB = {dcp_extra / shard:.3f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=200e6, help="model parameters (default 200e6)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per measurement; the median is reported")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir under the current directory)")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is None:
        sys.exit(launch(args))
    run_rank(args)


if __name__ == "__main__":
    main()
