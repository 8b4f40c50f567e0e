"""Warmup and Noam learning-rate schedules as ``torch.optim.lr_scheduler.LRScheduler`` subclasses.

What it is for: a linear warmup (with optional exponential decay) and the "Noam" warmup then
inverse-sqrt decay, with the exact values given in the class docstrings, usable in ``configure_optimizers`` and from LightningCLI's
``--lr_scheduler`` by class path (``lightning_utils.optim.WarmupLR``). Both are closed-form
functions of ``last_epoch``, so ``state_dict()`` / ``load_state_dict()`` resume them exactly and
``interval: step`` or ``epoch`` both work.

What it must never do: keep hidden state outside ``last_epoch`` and ``base_lrs``, or accept a
warmup length that makes the schedule undefined.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["NoamLR", "WarmupLR"]


def _check_warmup(warmup_steps: Any, where: str, minimum: int) -> int:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < minimum:
        raise ValueError(f"{where}: invalid warmup_steps={warmup_steps!r}; it must be an int >= {minimum}")
    return warmup_steps


class WarmupLR(LRScheduler):
    """Linear warmup to the base lr, then constant or exponential decay.

    With ``step = last_epoch + 1`` the lr factor is ``step / max(1, warmup_steps)`` while
    ``step < warmup_steps``, then ``(1 - decay_factor) ** (step - warmup_steps)`` (``1`` when
    ``decay_factor`` is ``None`` or 0). The first lr, right after construction, is already
    ``1 / warmup_steps`` of the base: warmup 4 gives ``0.25, 0.5, 0.75, 1.0, 1.0, ...`` and with
    ``decay_factor=0.1`` continues ``0.9, 0.81, 0.729, ...``; ``warmup_steps=0`` is constant.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: number of warmup steps (>= 0).
        decay_factor: per-step decay after warmup, in [0, 1), or ``None`` for none.
        last_epoch: index of the last step, -1 to start.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        decay_factor: float | None = None,
        last_epoch: int = -1,
    ) -> None:
        self.warmup_steps = _check_warmup(warmup_steps, "WarmupLR", 0)
        if decay_factor is not None and (
            isinstance(decay_factor, bool)
            or not isinstance(decay_factor, (int, float))
            or not 0.0 <= decay_factor < 1.0
        ):
            raise ValueError(f"WarmupLR: invalid decay_factor={decay_factor!r}; it must be in [0, 1) or None")
        self.decay_factor = float(decay_factor or 0.0)
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, last_epoch: int) -> float:
        """The multiplier of the base lr after ``last_epoch`` (0 right after construction)."""
        step = last_epoch + 1
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        if self.decay_factor:
            return (1.0 - self.decay_factor) ** (step - self.warmup_steps)
        return 1.0

    def get_lr(self) -> list[float | Tensor]:
        """The lrs after ``last_epoch``: closed form, so ``step(epoch)`` needs nothing else."""
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]


class NoamLR(LRScheduler):
    """The "Noam" schedule of the Transformer: linear warmup, then inverse-sqrt decay.

    With ``step = max(1, last_epoch)``:
    ``lr = base_lr * d_model ** -0.5 * min(step ** -0.5, step * warmup_steps ** -1.5)``.
    Warmup 4, d_model 1024, base lr 1 gives ``0.00390625`` at construction and after the first
    ``step()``, then ``0.0078125, 0.01171875, 0.015625, 0.013975...``.

    Args:
        optimizer: the wrapped optimizer (its lr is the base, usually 1.0).
        warmup_steps: number of warmup steps (>= 1).
        d_model: model width used for the ``d_model ** -0.5`` factor (>= 1).
        last_epoch: index of the last step, -1 to start.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        d_model: int = 1024,
        last_epoch: int = -1,
    ) -> None:
        self.warmup_steps = _check_warmup(warmup_steps, "NoamLR", 1)
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"NoamLR: invalid d_model={d_model!r}; it must be an int >= 1")
        self.d_model = d_model
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, last_epoch: int) -> float:
        """The multiplier of the base lr after ``last_epoch`` (0 right after construction)."""
        step = max(1, last_epoch)
        return self.d_model**-0.5 * min(step**-0.5, step * self.warmup_steps**-1.5)

    def get_lr(self) -> list[float | Tensor]:
        """The lrs after ``last_epoch``: closed form, so ``step(epoch)`` needs nothing else."""
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]
