"""MetricsPrinter: one JSON line per optimizer step, running means, stdout and file, rank 0 only.

Rank 0 only under DDP is asserted in tests/callbacks/test_training_control_ddp.py (one writer, one line per step).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from control_scripts.recording_module import RecordingModule, RecordingModuleWithVal
from helpers.lightning import cpu_trainer

from lightning_utils.callbacks.metrics_printer import MetricsPrinter


def fit(tmp_path, printer, model=None, **kwargs):
    trainer = cpu_trainer(tmp_path, [printer], **kwargs)
    model = model or RecordingModule()
    trainer.fit(model)
    trainer.model_losses = model.losses
    return trainer


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_file_lines_with_running_mean(tmp_path, capsys):
    path = tmp_path / "logs" / "metrics.jsonl"
    trainer = fit(tmp_path, MetricsPrinter(path=path, window=3), max_steps=7)
    rows = read(path)
    assert [r["loss"] for r in rows] == pytest.approx(trainer.model_losses, rel=1e-5)  # each step's own loss
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert {"step", "epoch", "loss", "loss_mean", "lr", "step_time"} <= set(rows[0])
    losses = [r["loss"] for r in rows]
    for i, row in enumerate(rows):
        window = losses[max(0, i - 2) : i + 1]
        assert row["loss_mean"] == pytest.approx(sum(window) / len(window), rel=1e-4)
    assert all(r["lr"] == 0.1 and r["step_time"] >= 0 for r in rows)
    assert capsys.readouterr().out == ""  # a path and no stdout=True: nothing printed


def test_stdout_by_default_every_n_steps_and_append(tmp_path, capsys):
    fit(tmp_path, MetricsPrinter(every_n_steps=2, window=None, keys=["loss"]), max_steps=5)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["step"] for r in lines] == [2, 4]
    assert set(lines[0]) == {"step", "epoch", "loss", "lr", "step_time"}  # no means, only chosen keys
    path = tmp_path / "m.jsonl"
    fit(tmp_path, MetricsPrinter(path=path, stdout=True), max_steps=2)
    fit(tmp_path, MetricsPrinter(path=path), max_steps=3)
    assert [r["step"] for r in read(path)] == [1, 2, 1, 2, 3]  # appended, never truncated
    assert capsys.readouterr().out.count('"step"') == 2


def test_gradient_accumulation_one_line_per_optimizer_step(tmp_path):
    path = tmp_path / "m.jsonl"
    fit(tmp_path, MetricsPrinter(path=path), max_steps=3, accumulate_grad_batches=2)
    assert [r["step"] for r in read(path)] == [1, 2, 3]


def test_validation_metrics_appear_on_the_line_of_the_step_they_followed_only(tmp_path):
    """Validation runs after steps 3 and 6: its metrics are on those two lines and nowhere else,
    and their running mean is over those two fresh values (never over repeats)."""
    path = tmp_path / "m.jsonl"
    model = RecordingModuleWithVal()
    fit(
        tmp_path,
        MetricsPrinter(path=path, window=10, digits=None),
        model=model,
        max_steps=7,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    rows = read(path)
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6] == model.val_steps
    assert [r["step"] for r in rows if "val_loss_mean" in r] == [3, 6]
    val3, val6 = rows[2]["val_loss"], rows[5]["val_loss"]
    assert val3 != val6  # the model moved between the two validations
    assert rows[2]["val_loss_mean"] == pytest.approx(val3, rel=1e-12)
    assert rows[5]["val_loss_mean"] == pytest.approx((val3 + val6) / 2, rel=1e-12)
    assert all("loss" in r and "loss_mean" in r for r in rows)  # training's own metrics: every line


class LogsSometimes(RecordingModule):
    """Logs ``sometimes`` on even steps only, and runs a per-step LR schedule 0.1, 0.2, 0.3..."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step % 2 == 1:  # the step being trained is global_step + 1
            self.log("sometimes", float(self.trainer.global_step + 1))
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: k + 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_a_line_carries_what_that_step_logged_and_the_lr_it_used(tmp_path):
    path = tmp_path / "m.jsonl"
    model = LogsSometimes()
    fit(tmp_path, MetricsPrinter(path=path, window=3, digits=None), model=model, max_steps=6)
    rows = read(path)
    assert [r.get("sometimes") for r in rows] == [None, 2.0, None, 4.0, None, 6.0]
    assert [r.get("sometimes_mean") for r in rows] == [None, 2.0, None, 3.0, None, 4.0]  # over fresh values
    # step k trained with lr 0.1 * k; the scheduler had already moved on when the step ended
    assert [r["lr"] for r in rows] == pytest.approx([0.1 * k for k in range(1, 7)], rel=1e-12)
    assert [lr for _, lr in model.lr_trace] == pytest.approx([0.1 * k for k in range(2, 8)], rel=1e-12)


def test_epoch_level_metrics_are_on_the_last_line_of_their_epoch(tmp_path):
    """``loss_epoch_synced`` is logged with on_epoch=True: Lightning computes it when the epoch ends
    (16 steps here, then a run stopped after 4 steps of the next epoch)."""
    path = tmp_path / "m.jsonl"
    fit(tmp_path, MetricsPrinter(path=path, window=None), max_steps=20)
    rows = read(path)
    assert [r["step"] for r in rows if "loss_epoch_synced" in r] == [16, 20]


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="every_n_steps"):
        MetricsPrinter(every_n_steps=0)
    with pytest.raises(ValueError, match="window"):
        MetricsPrinter(window=-1)
    with pytest.raises(ValueError, match="digits"):
        MetricsPrinter(digits=0)


def test_running_mean_sees_unprinted_steps_and_is_exact(tmp_path):
    path = tmp_path / "m.jsonl"
    trainer = fit(
        tmp_path, MetricsPrinter(path=path, window=3, every_n_steps=2, digits=None, keys=["loss"]), max_steps=7
    )
    losses = trainer.model_losses  # float32 values, exactly representable in the float64 window
    rows = read(path)
    assert [r["step"] for r in rows] == [2, 4, 6]
    for row in rows:
        window = losses[max(0, row["step"] - 3) : row["step"]]
        assert row["loss"] == pytest.approx(losses[row["step"] - 1], rel=1e-7)
        assert row["loss_mean"] == pytest.approx(sum(window) / len(window), rel=1e-12, abs=0)


def test_a_logged_metric_named_like_a_mean_is_not_overwritten(tmp_path):
    class LogsItsOwnMean(RecordingModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("loss_mean", 123.0)  # the user's own metric, which happens to have our suffix
            return loss

    path = tmp_path / "m.jsonl"
    fit(tmp_path, MetricsPrinter(path=path, window=2, keys=["loss", "loss_mean"]), model=LogsItsOwnMean(), max_steps=2)
    assert [r["loss_mean"] for r in read(path)] == [123.0, 123.0]
