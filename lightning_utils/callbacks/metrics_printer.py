"""``MetricsPrinter``: one JSON line of training metrics per optimizer step, with running means.

Each line is a JSON object::

    {"step": 120, "epoch": 0, "loss": 2.31, "loss_mean": 2.4467, "lr": 0.0003, "step_time": 0.052}

A step's line holds what was logged for that step and nothing older: the scalars the
LightningModule logged (``self.log``) in that training step, those of a validation run that
followed it, and epoch-level values on the last line of their epoch; the learning rate that
step used (the first optimizer's, read just before its update, not the one a scheduler set
for the next step); the step time; and ``<key>_mean``, the mean of the key's last ``window``
fresh values (a value repeated by Lightning's ``callback_metrics`` is not fresh): each fresh
value goes into a fixed-size window (a ``deque``), and a printed line's mean is computed over
that window by ``torchmetrics.aggregation.MeanMetric``. Lines go to stdout and/or an
append-only file (``lightning-utils plot FILE`` draws them), written and flushed one by one so
that a crash loses nothing already printed.

Freshness: Lightning keeps every metric ever logged in ``trainer.callback_metrics`` (a validation
loss stays there until the next validation). Each value Lightning reports there is a view of the
tensor the last ``self.log`` (or epoch-end reduction) made, and every log call makes a new one.
The printer keeps the tensors it saw last (so their memory cannot be reused) and counts a key as
fresh when its tensor's memory differs from the one seen before.

This callback must never print or write on a rank other than global rank 0, and never run a
collective: its running means are local (``sync_on_compute=False``) because only rank 0 computes
them, and Lightning has already reduced ``sync_dist`` metrics.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torchmetrics.aggregation import MeanMetric

__all__ = ["MetricsPrinter"]


def _round(value: float, digits: int | None) -> float | str | None:
    if not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; "nan" keeps the line valid and visible
    if digits is None or value == 0:
        return value
    return float(f"{value:.{digits}g}")


def _first_lr(trainer: Trainer) -> float | None:
    if trainer.optimizers and trainer.optimizers[0].param_groups:
        lr = trainer.optimizers[0].param_groups[0].get("lr")
        if lr is not None:
            return float(lr)
    return None


def _is_new(before: Any, now: Any) -> bool:
    """Whether ``now`` is another logged value than ``before`` (the value object last read)."""
    if before is now:
        return False
    if isinstance(before, torch.Tensor) and isinstance(now, torch.Tensor):
        # A new view of the same tensor (Lightning detaches on every read) is the same value;
        # ``before`` is still referenced, so its memory cannot hold a newer tensor.
        return not (
            before.device == now.device
            and before.dtype == now.dtype
            and before.shape == now.shape
            and before.data_ptr() == now.data_ptr()
        )
    return True


class MetricsPrinter(Callback):
    """Print each optimizer step's metrics as a JSON line (global rank 0 only).

    Args:
        path: append the lines to this file (created with its folder). ``None``: no file.
        stdout: print the lines to stdout. Default: only when there is no ``path``.
        every_n_steps: one line every N optimizer steps (running means still see every step).
        window: the running-mean window in steps; ``0``/``None`` adds no ``*_mean`` keys.
        keys: the logged metric names to include (``None``: every scalar in
            ``trainer.callback_metrics``).
        mean_keys: the metric names that get a running mean (``None``: all included ones).
        digits: significant digits of floats in the output (``None``: full precision).

    Lightning refreshes ``trainer.callback_metrics`` right after ``on_train_batch_end``, so a
    step's line is written when the next batch starts (or the epoch/fit ends).

    Cost: a step appends one float per key to its window (well under a microsecond); only a
    printed line builds a tensor of each window and runs torchmetrics' ``MeanMetric`` over it
    (~50 us per key). ``torchmetrics.aggregation.RunningMean`` gives the same means but costs
    ~50 us per key and step to update plus ~1 ms per key to compute (it keeps ``window`` copies
    of the metric state and reduces them one by one).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        stdout: bool | None = None,
        every_n_steps: int = 1,
        window: int | None = 100,
        keys: Sequence[str] | None = None,
        mean_keys: Sequence[str] | None = None,
        digits: int | None = 6,
    ) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if window is not None and (not isinstance(window, int) or window < 0):
            raise ValueError(f"window must be an integer >= 0 or None, got {window!r}")
        if digits is not None and (not isinstance(digits, int) or digits < 1):
            raise ValueError(f"digits must be an integer >= 1 or None, got {digits!r}")
        self.path = Path(path) if path is not None else None
        self.stdout = (path is None) if stdout is None else bool(stdout)
        self.every_n_steps = every_n_steps
        self.window = window or None
        self.keys = list(keys) if keys is not None else None
        self.mean_keys = set(mean_keys) if mean_keys is not None else None
        self.digits = digits
        self._windows: dict[str, deque[float]] = {}
        # One metric for every key: reset, fed a whole window, computed; local only, since a synced
        # compute on rank 0 alone would wait forever for the other ranks.
        self._mean = MeanMetric(nan_strategy="disable", sync_on_compute=False, compute_with_cache=False).set_dtype(
            torch.float64
        )
        self._file: IO[str] | None = None
        self._seen: dict[str, Any] = {}  # the value objects of the last read, kept alive (see the module doc)
        self._step_lr: float | None = None
        self._pending: dict[str, Any] | None = None
        self._last_step: int | None = None
        self._last_time: float | None = None
        self._active = False

    # hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._active = trainer.is_global_zero
        if self._active and self.path is not None and self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - open across hooks, closed in teardown or on_exception

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step
        self._last_time = time.monotonic()
        self._step_lr = None
        # What is in callback_metrics now was logged before this fit (an earlier run or validation).
        self._seen = dict(trainer.callback_metrics)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # The rate this step uses: a per-step scheduler moves the optimizer's lr on before
        # on_train_batch_end, to the rate of the next step.
        if self._step_lr is None:
            self._step_lr = _first_lr(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._flush(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: not an optimizer step
            return
        now = time.monotonic()
        previous = self._last_step if self._last_step is not None else step - 1
        record: dict[str, Any] = {"step": step, "epoch": trainer.current_epoch}
        if self._last_time is not None:
            record["step_time"] = (now - self._last_time) / max(1, step - previous)
        lr, self._step_lr = (self._step_lr if self._step_lr is not None else _first_lr(trainer)), None
        if lr is not None:
            record["lr"] = lr
        self._last_step, self._last_time = step, now
        self._pending = record

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Other ranks may not be here: write what is known without reading the metrics (a read
        # can be a collective, see _flush).
        self._flush(trainer, read_metrics=False)
        self._close()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._flush(trainer)
            self._close()

    # internals --------------------------------------------------------------------------------
    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _scalars(self, trainer: Trainer) -> dict[str, float]:
        """The scalars logged since the last read (see "Freshness" in the module docstring)."""
        out: dict[str, float] = {}
        current = dict(trainer.callback_metrics)
        seen, self._seen = self._seen, current
        for key, value in current.items():
            if self.keys is not None and key not in self.keys:
                continue
            if not _is_new(seen.get(key), value):
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue
                out[key] = float(value.detach().float().item())
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = float(value)
        return out

    def _window_mean(self, window: deque[float]) -> float:
        self._mean.reset()
        self._mean.update(torch.tensor(list(window), dtype=torch.float64))
        return float(self._mean.compute())

    def _flush(self, trainer: Trainer, read_metrics: bool = True) -> None:
        # Every rank reads trainer.callback_metrics at the same hooks, though only rank 0 writes:
        # Lightning computes that property on access, and for epoch-level ``sync_dist`` metrics the
        # computation is an all-reduce, which would hang if rank 0 ran it alone.
        # Every rank keeps the same pending record (built from the step count, identical everywhere).
        record, self._pending = self._pending, None
        if record is None:
            return
        printed = record["step"] % self.every_n_steps == 0
        # The same decision on every rank (it depends on the step and the configuration only), so
        # the collective that reading the metrics can be happens on all ranks or on none.
        metrics = self._scalars(trainer) if read_metrics and (printed or self.window) else {}
        if not self._active:
            return
        for key, value in metrics.items():
            record.setdefault(key, value)
            if self.window and (self.mean_keys is None or key in self.mean_keys):
                window = self._windows.get(key)
                if window is None:
                    window = self._windows[key] = deque(maxlen=self.window)
                window.append(value)
                if printed and f"{key}_mean" not in self._seen:  # only for a written line; never over a logged metric
                    record[f"{key}_mean"] = self._window_mean(window)
        if not printed:
            return
        line = json.dumps({k: _round(v, self.digits) if isinstance(v, float) else v for k, v in record.items()})
        if self.stdout:
            print(line, file=sys.stdout, flush=True)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
