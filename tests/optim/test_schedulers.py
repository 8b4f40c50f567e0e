"""WarmupLR and NoamLR: exact values, resume from state_dict, step(epoch), validation."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_utils.optim import NoamLR, WarmupLR


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(scheduler_cls, steps: int, **kwargs) -> list[float]:
    opt = _optimizer()
    sched = scheduler_cls(opt, **kwargs)
    values = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        opt.step()
        sched.step()
        values.append(opt.param_groups[0]["lr"])
    return values


def test_warmup_values():
    assert _lrs(WarmupLR, 5, warmup_steps=4) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert _lrs(WarmupLR, 7, warmup_steps=4, decay_factor=0.1) == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 0.9, 0.81, 0.729, 0.6561]
    )
    assert _lrs(WarmupLR, 3, warmup_steps=0) == pytest.approx([1.0] * 4)
    # without warmup the decay counts from step 1: the first lr is already decayed once
    assert _lrs(WarmupLR, 2, warmup_steps=0, decay_factor=0.5) == pytest.approx([0.5, 0.25, 0.125])


def test_noam_values():
    assert _lrs(NoamLR, 5, warmup_steps=4, d_model=1024) == pytest.approx(
        [0.00390625, 0.00390625, 0.0078125, 0.01171875, 0.015625, 0.013975424859373685], rel=1e-9
    )


@pytest.mark.parametrize(
    ("scheduler_cls", "kwargs"),
    [(WarmupLR, {"warmup_steps": 3, "decay_factor": 0.2}), (NoamLR, {"warmup_steps": 3, "d_model": 64})],
)
def test_state_dict_resume_continues_the_schedule(scheduler_cls, kwargs):
    full = _lrs(scheduler_cls, 8, **kwargs)
    opt = _optimizer()
    sched = scheduler_cls(opt, **kwargs)
    for _ in range(4):
        opt.step()
        sched.step()
    saved = sched.state_dict()
    opt2 = _optimizer()
    sched2 = scheduler_cls(opt2, **kwargs)
    sched2.load_state_dict(saved)
    values = [sched2.get_last_lr()[0]]
    for _ in range(4):
        opt2.step()
        sched2.step()
        values.append(opt2.param_groups[0]["lr"])
    assert values == pytest.approx(full[4:])


def test_multiple_groups_scale_their_own_base_lr():
    opt = torch.optim.SGD(
        [
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0},
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1},
        ]
    )
    WarmupLR(opt, warmup_steps=2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05])


def test_closed_form_step_with_epoch():
    opt = _optimizer()
    sched = WarmupLR(opt, warmup_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates step(epoch) but still supports it
        sched.step(2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("scheduler_cls", "kwargs", "option"),
    [
        (WarmupLR, {"warmup_steps": -1}, "warmup_steps"),
        (WarmupLR, {"warmup_steps": 2.5}, "warmup_steps"),
        (WarmupLR, {"warmup_steps": 2, "decay_factor": 1.0}, "decay_factor"),
        (WarmupLR, {"warmup_steps": 2, "decay_factor": -0.1}, "decay_factor"),
        (NoamLR, {"warmup_steps": 0}, "warmup_steps"),
        (NoamLR, {"warmup_steps": 4, "d_model": 0}, "d_model"),
    ],
)
def test_bad_arguments_name_the_option(scheduler_cls, kwargs, option):
    with pytest.raises(ValueError, match=option):
        scheduler_cls(_optimizer(), **kwargs)
