"""The actions of ``TrainingControl`` that need torch but no trainer: set the lr, set the loss
scale, time the steps and estimate the time left.

Each one works on the objects Lightning hands out (optimizers, LR schedulers, the AMP grad
scaler, step numbers and times) and returns the line to report, so it can be tested on plain
torch objects. Which command runs which action, and when, is decided in
:mod:`lightning_utils.control.dispatch`.

This module must never import ``lightning``, read a trainer, or log: the callback reports.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from lightning_utils._internals import inner_lr_schedulers

__all__ = ["StepClock", "duration", "last_step", "set_loss_scale", "set_lr", "time_left"]

# The bases some schedulers keep in the param group (LambdaLR and friends: initial_lr; OneCycleLR:
# max_lr and min_lr); they move with the lr.
_GROUP_BASES = ("initial_lr", "max_lr", "min_lr")
# The bases some schedulers keep on themselves, one per param group (CyclicLR: max_lrs).
_SCHEDULER_BASES = ("base_lrs", "max_lrs")


def _all_schedulers(schedulers: Iterable[Any]) -> list[Any]:
    """The schedulers and those they hold (``SequentialLR``, ``ChainedScheduler``), depth first."""
    out: list[Any] = []
    for scheduler in schedulers:
        out.append(scheduler)
        out.extend(_all_schedulers(inner_lr_schedulers(scheduler)))
    return out


def set_lr(optimizers: Sequence[torch.optim.Optimizer], schedulers: Iterable[Any], value: float) -> str:
    """Set the lr of every param group of every optimizer to ``value``, so that the schedule continues from it.

    Closed-form schedulers (``LambdaLR``, ``WarmupLR``, ``OneCycleLR``) recompute
    ``lr = base * factor(step)`` at every scheduler step, so their bases (in the param group and on
    the scheduler) are scaled by new lr / old lr: after ``lr 0.2`` the next lr is
    ``0.2 * f(t+1) / f(t)``, not ``base * f(t+1)`` again. Chainable schedulers just continue from
    the new value. Where the old lr was 0 (the first warmup step) there is no ratio and ``value``
    becomes the base. A tensor lr (capturable or compiled optimizers) is filled in place.

    Returns the line to report.
    """
    ratios: dict[int, float | None] = {}  # id(param group) -> new lr / old lr
    groups = 0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            old = float(group.get("lr", 0.0))
            ratio = value / old if old > 0 else None
            ratios[id(group)] = ratio
            if isinstance(group.get("lr"), torch.Tensor):
                group["lr"].fill_(value)
            else:
                group["lr"] = value
            for key in _GROUP_BASES:
                base = group.get(key)
                if not isinstance(base, (int, float)) or isinstance(base, bool):
                    continue
                if ratio is not None:
                    group[key] = base * ratio
                elif key == "initial_lr":
                    group[key] = value
            groups += 1
    notes: list[str] = []
    for scheduler in _all_schedulers(schedulers):
        param_groups = getattr(getattr(scheduler, "optimizer", None), "param_groups", None)
        for attr in _SCHEDULER_BASES:
            bases = getattr(scheduler, attr, None)
            if not isinstance(bases, list) or param_groups is None or len(bases) != len(param_groups):
                continue
            rebased = []
            for base, group in zip(bases, param_groups):
                ratio = ratios.get(id(group))
                rebased.append(base * ratio if ratio is not None else (value if attr == "base_lrs" else base))
            setattr(scheduler, attr, rebased)
            if attr == "base_lrs":
                notes.append(f"{type(scheduler).__name__} base lr now {', '.join(f'{b:g}' for b in rebased)}")
    # The bases say where the schedule goes from here (during a warmup, far above the value typed).
    rebased_note = f"; the schedule continues from it ({'; '.join(notes)})" if notes else ""
    return f"lr set to {value:g} on {groups} param group(s) of {len(optimizers)} optimizer(s){rebased_note}"


def set_loss_scale(scaler: Any, value: float) -> bool:
    """Set an AMP ``GradScaler``'s loss scale to ``value``; False when ``scaler`` is None or disabled.

    Goes through the scaler's public ``state_dict``/``load_state_dict``: before the first scaled
    step (no scale tensor yet) the scale then starts from ``value``; after it the scale tensor is
    filled in place. Growth factor, backoff and the growth tracker stay as they were.
    """
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return False
    state = scaler.state_dict()
    state["scale"] = float(value)
    scaler.load_state_dict(state)
    return True


class StepClock:
    """The mean wall time of an optimizer step over the last ``window`` step boundaries.

    :meth:`start` at the start of training, :meth:`tick` at each boundary with the number of
    optimizer steps since the previous one (more than 1 when boundaries are skipped).
    """

    def __init__(self, window: int = 100) -> None:
        self._seconds: deque[float] = deque(maxlen=window)
        self._last: float | None = None

    def start(self, now: float) -> None:
        self._last = now

    def tick(self, steps: int, now: float) -> None:
        if self._last is not None:
            self._seconds.append((now - self._last) / steps)
        self._last = now

    def seconds_per_step(self) -> float | None:
        """``None`` until a step was timed."""
        return sum(self._seconds) / len(self._seconds) if self._seconds else None


def last_step(max_steps: int | None, estimated_stepping_batches: Callable[[], float]) -> int | None:
    """The run's last step: ``max_steps`` when set (> 0), else the estimate (read only then; it may
    build the data loader), else ``None`` when that is infinite."""
    if max_steps and max_steps > 0:
        return max_steps
    estimate = estimated_stepping_batches()
    return int(estimate) if estimate != float("inf") else None


def duration(seconds: float) -> str:
    """``"42.0s"``, ``"3m 5s"``, ``"2h 0m 7s"``, ``"1d 0h 0m 0s"``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    parts += [f"{minutes}m", f"{sec}s"]
    return " ".join(parts)


def time_left(step: int, target: int | None, seconds_per_step: float | None) -> str:
    """The line that answers ``time``/``time to N`` at ``step``."""
    if target is None:
        return "time: the run has no known last step; use 'time to N'"
    if target < step:
        return f"time: step {target} is behind: the run is at step {step}"
    if target == step:
        return f"time: the run is at step {step} now"
    if seconds_per_step is None:
        return f"time: at step {step}; no step timed yet"
    left = target - step
    return f"time: step {step}/{target}, {seconds_per_step:.3g} s/step, about {duration(left * seconds_per_step)} left"
