"""The trainer-free actions of TrainingControl on plain torch objects: lr (and the schedules that
continue from it), loss scale, step timing and the time left.

The same actions driven by commands in real fits are in tests/callbacks/test_training_control.py.
"""

from __future__ import annotations

import pytest
import torch

from lightning_utils.control.actions import StepClock, duration, last_step, set_loss_scale, set_lr, time_left


def params(n: int) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(2)) for _ in range(n)]


def test_set_lr_on_every_group_of_every_optimizer_tensor_lr_included():
    p = params(4)
    opts = [
        torch.optim.SGD([{"params": [p[0]]}, {"params": [p[1]], "lr": 0.5}], lr=0.1),
        torch.optim.AdamW([{"params": [p[2]]}, {"params": [p[3]], "lr": torch.tensor(0.3)}], lr=0.2),
    ]
    tensor_lr = opts[1].param_groups[1]["lr"]
    message = set_lr(opts, [], 1e-3)
    assert [float(g["lr"]) for o in opts for g in o.param_groups] == pytest.approx([1e-3] * 4)
    assert opts[1].param_groups[1]["lr"] is tensor_lr  # filled in place
    assert message == "lr set to 0.001 on 4 param group(s) of 2 optimizer(s)"


def test_set_lr_rebases_closed_form_schedulers_by_the_ratio():
    opt = torch.optim.SGD(params(1), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)  # lr = base * 0.5
    message = set_lr([opt], [sched], 0.2)
    assert opt.param_groups[0]["lr"] == 0.2
    assert sched.base_lrs == [pytest.approx(0.4)] and opt.param_groups[0]["initial_lr"] == pytest.approx(0.4)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)  # continues from the value set, no snap back
    assert "LambdaLR base lr now 0.4" in message and "the schedule continues from it" in message


def test_set_lr_reaches_the_schedulers_inside_a_sequential_lr():
    opt = torch.optim.SGD(params(1), lr=1.0)
    first = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    second = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.25)
    outer = torch.optim.lr_scheduler.SequentialLR(opt, [first, second], milestones=[100])
    set_lr([opt], [outer], 0.1)  # lr was 0.5: ratio 0.2
    assert first.base_lrs == [pytest.approx(0.2)] and second.base_lrs == [pytest.approx(0.2)]


def test_set_lr_from_zero_makes_the_value_the_base_and_keeps_other_bases():
    opt = torch.optim.SGD(params(1), lr=1.0)
    cyclic = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.0, max_lr=1.0, step_size_up=4)  # lr 0 at its start
    assert opt.param_groups[0]["lr"] == 0.0
    set_lr([opt], [cyclic], 0.3)
    assert cyclic.base_lrs == [0.3] and cyclic.max_lrs == [1.0]  # no ratio from 0: max stays
    assert opt.param_groups[0]["initial_lr"] == 0.3


def test_set_loss_scale_before_and_after_the_scale_exists():
    assert not set_loss_scale(None, 8.0)
    assert not set_loss_scale(torch.amp.GradScaler("cpu", enabled=False), 8.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=7)
    assert set_loss_scale(scaler, 256.0)
    assert scaler.get_scale() == 256.0  # no scale tensor yet: it will start from 256
    scaler.scale(torch.tensor(1.0))  # creates the scale tensor
    assert scaler.get_scale() == 256.0
    assert set_loss_scale(scaler, 1024.0)
    assert scaler.get_scale() == 1024.0 and scaler.get_growth_interval() == 7


def test_step_clock_averages_the_last_window_per_optimizer_step():
    clock = StepClock(window=2)
    assert clock.seconds_per_step() is None
    clock.tick(1, 5.0)  # not started: nothing to time against
    assert clock.seconds_per_step() is None
    clock.start(10.0)
    clock.tick(1, 11.0)  # 1 s for one step
    clock.tick(2, 15.0)  # 4 s for two steps: 2 s each
    assert clock.seconds_per_step() == pytest.approx(1.5)
    clock.tick(1, 18.0)  # 3 s; the 1 s boundary leaves the window
    assert clock.seconds_per_step() == pytest.approx(2.5)


def test_last_step_reads_the_estimate_only_without_max_steps():
    def never() -> float:
        raise AssertionError("the estimate may build the data loader: read it only when needed")

    assert last_step(500, never) == 500
    assert last_step(-1, lambda: 120.0) == 120
    assert last_step(None, lambda: float("inf")) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(-3, "0.0s"), (42.04, "42.0s"), (185, "3m 5s"), (7207, "2h 0m 7s"), (86400, "1d 0h 0m 0s")],
)
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_time_left_lines():
    assert time_left(3, None, 0.5) == "time: the run has no known last step; use 'time to N'"
    assert time_left(3, 100, None) == "time: at step 3; no step timed yet"
    assert time_left(40, 100, 0.5) == "time: step 40/100, 0.5 s/step, about 30.0s left"
    # a target behind the run is said to be behind, never "100/10 ... 0.0s left"
    assert time_left(58, 10, 0.5) == "time: step 10 is behind: the run is at step 58"
    assert time_left(58, 10, None) == "time: step 10 is behind: the run is at step 58"
    assert time_left(10, 10, 0.5) == "time: the run is at step 10 now"
