"""Overhead of run-time control: TrainingControl (+ MetricsPrinter) vs a bare Trainer.fit.

    .venv/bin/python benchmarks/training_control.py [--steps 300] [--repeats 3] [--keys 4]

Prints, measured in this run:
  * the cost of one TrainingControl step boundary (poll an idle stdin reader, parse nothing,
    check the cadence) in microseconds, single process;
  * the CPU the idle reader thread burns while waiting for input (it should sleep in poll());
  * wall time per step of a small Trainer.fit (logging --keys scalars per step) with each
    callback vs a bare fit, as a ratio (best of --repeats, runs interleaved), including
    MetricsPrinter with its means done the straightforward way, one torchmetrics RunningMean per
    key updated every step (what MetricsPrinter did before).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "callbacks"))
from control_scripts.fakes import FakeTrainer

from lightning_utils.callbacks.metrics_printer import MetricsPrinter
from lightning_utils.callbacks.training_control import TrainingControl
from lightning_utils.control.sources import StdinSource


class RunningMeanPrinter(MetricsPrinter):
    """The alternative: a torchmetrics RunningMean per key, updated at every step (every_n_steps=1)."""

    def _window_mean(self, window):
        from torchmetrics.aggregation import RunningMean

        means = self.__dict__.setdefault("_running", {})
        key = id(window)
        if key not in means:
            means[key] = RunningMean(window=self.window, nan_strategy="disable", sync_on_compute=False)
        means[key].update(torch.tensor(window[-1], dtype=torch.float64))
        return float(means[key].compute())


class MLP(LightningModule):
    def __init__(self, keys: int = 4):
        super().__init__()
        self.keys = keys
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(4096, 64, generator=g)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = torch.nn.functional.mse_loss(self.net(x), x)
        self.log("loss", loss)
        for i in range(1, self.keys):  # e.g. per-codebook losses, accuracy, grad norm
            self.log(f"metric{i}", loss.detach() * i)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x), batch_size=16)


def boundary_cost_us(n: int = 20000) -> float:
    r, w = os.pipe()  # an open, idle stdin: the reader thread waits in poll()
    with tempfile.TemporaryDirectory() as d:
        trainer = FakeTrainer(Path(d), max_steps=n + 1)
        control = TrainingControl(source=StdinSource(fd=r), signal="SIGUSR1")
        control.setup(trainer, None, "fit")
        control.on_train_start(trainer, None)
        t0 = time.perf_counter()
        for step in range(1, n + 1):
            trainer.global_step = step
            control.on_train_batch_end(trainer, None, None, None, step - 1)
        elapsed = time.perf_counter() - t0
        control.teardown(trainer, None, "fit")
    os.close(r)
    os.close(w)
    return elapsed / n * 1e6


def idle_reader_cpu_ms_per_s(seconds: float = 1.0) -> float:
    r, w = os.pipe()
    source = StdinSource(fd=r)
    source.start()
    c0, t0 = time.process_time(), time.perf_counter()
    time.sleep(seconds)
    cpu = time.process_time() - c0
    wall = time.perf_counter() - t0
    source.close()
    os.close(r)
    os.close(w)
    return cpu / wall * 1e3


def fit_seconds_per_step(steps: int, variant: str, root: Path, keys: int) -> float:
    r, w = os.pipe()  # TrainingControl reads an open, idle pipe, as from a terminal nobody types in
    callbacks = {
        "bare": [],
        "control": [TrainingControl(source=StdinSource(fd=r), save_on_train_end=False)],
        "printer": [MetricsPrinter(path=root / "m.jsonl")],
        "runningmean": [RunningMeanPrinter(path=root / "m.jsonl")],
        "printer/10": [MetricsPrinter(path=root / "m.jsonl", every_n_steps=10)],
        "both": [
            TrainingControl(source=StdinSource(fd=r), save_on_train_end=False),
            MetricsPrinter(path=root / "m.jsonl", every_n_steps=10),
        ],
    }[variant]
    trainer = Trainer(
        max_steps=steps,
        callbacks=callbacks,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t0 = time.perf_counter()
    trainer.fit(MLP(keys))
    elapsed = time.perf_counter() - t0
    os.close(r)
    os.close(w)
    return elapsed / steps


VARIANTS = ("bare", "control", "printer", "runningmean", "printer/10", "both")
LABELS = {
    "control": "TrainingControl (idle stdin)",
    "printer": "MetricsPrinter (every step, window 100)",
    "runningmean": "  same, RunningMean per key (before)",
    "printer/10": "MetricsPrinter (every 10 steps, window 100)",
    "both": "TrainingControl + MetricsPrinter/10",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keys", type=int, default=4, help="scalars the model logs per step")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    print(f"TrainingControl step boundary (idle stdin reader): {boundary_cost_us():.1f} us/step")
    print(f"idle stdin reader thread: {idle_reader_cpu_ms_per_s():.2f} ms CPU per second of waiting")
    best = {v: float("inf") for v in VARIANTS}
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.repeats):  # interleaved, so load changes hit every variant alike
            for v in VARIANTS:
                best[v] = min(
                    best[v], fit_seconds_per_step(args.steps, v, Path(d) / f"{v.replace('/', '_')}{i}", args.keys)
                )
    bare = best["bare"]
    print(
        f"Trainer.fit of a small MLP logging {args.keys} scalars, {args.steps} steps, best of {args.repeats}: "
        f"bare {bare * 1e3:.3f} ms/step"
    )
    for v in VARIANTS[1:]:
        print(
            f"  with {LABELS[v]:<44} {best[v] * 1e3:.3f} ms/step  ratio {best[v] / bare:.3f}x "
            f"({(best[v] - bare) * 1e6:+.0f} us/step)"
        )


if __name__ == "__main__":
    main()
