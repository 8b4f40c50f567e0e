"""Test doubles for TrainingControl: a scripted command source and a minimal fake trainer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from lightning_utils.control.sources import CommandSource


class StepScript(CommandSource):
    """Queues ``script[step]`` when training reaches ``step`` (a person typing then); a poll
    returns everything queued so far, like a real reader."""

    def __init__(self, step_of: Callable[[], int], script: dict[int, list[str]]):
        self.step_of, self.script = step_of, dict(script)
        self.started = self.closed = 0
        self.polls = 0

    def start(self) -> None:
        self.started += 1

    def close(self) -> None:
        self.closed += 1

    def poll(self) -> list[str]:
        self.polls += 1
        now = self.step_of()
        lines = []
        for step in sorted(k for k in self.script if k <= now):
            lines += self.script.pop(step)
        return lines


class FakeTrainer:
    """Just what TrainingControl touches; records saves in ``trace`` as ("save", step)."""

    def __init__(self, root: Path, optimizers: list[torch.optim.Optimizer] | None = None, max_steps: int = 12):
        self.trace: list[tuple[str, int]] = []
        self.global_step = 0
        self.current_epoch = 0
        self.is_global_zero = True
        self.global_rank = 0
        self.should_stop = False
        self.default_root_dir = str(root)
        self.checkpoint_callback = None
        self.callbacks: list[Any] = []
        self.max_steps = max_steps
        self.min_steps: int | None = None
        self.estimated_stepping_batches = max_steps
        self.optimizers = (
            optimizers if optimizers is not None else [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)]
        )
        self.lr_scheduler_configs: list[Any] = []
        self.precision_plugin = SimpleNamespace()
        self.precision = "32-true"
        self.strategy = SimpleNamespace(
            broadcast=lambda obj, src=0: obj,
            reduce_boolean_decision=lambda decision, all=True: decision,
            save_checkpoint=self._write,
            checkpoint_io=None,
        )
        # what TrainingControl's save builds the checkpoint with (Lightning's checkpoint connector)
        self._checkpoint_connector = SimpleNamespace(dump_checkpoint=lambda weights_only=None: {})
        self.checkpoint_callbacks: list[Any] = []
        self.callback_metrics: dict[str, Any] = {}
        self.saved_paths: list[Path] = []

    def _write(self, checkpoint, path, storage_options=None):
        self.trace.append(("save", self.global_step))
        self.saved_paths.append(Path(path))

    def save_checkpoint(self, path, weights_only=None, storage_options=None):
        self._write({}, path)


class RecordingExporter:
    def __init__(self, trace: list[tuple[str, int]]):
        self.trace = trace

    def export(self, trainer, pl_module, state_dict=None):
        self.trace.append(("export", trainer.global_step))


def drive(control, trainer: FakeTrainer, steps: int, pl_module: Any = None) -> list[tuple[str, int]]:
    """Run the hooks the way Trainer.fit does for ``steps`` optimizer steps (or until should_stop)."""
    control.setup(trainer, pl_module, "fit")
    control.on_train_start(trainer, pl_module)
    if trainer.should_stop:
        trainer.trace.append(("quit", trainer.global_step))
    else:
        while trainer.global_step < steps:
            trainer.global_step += 1
            control.on_train_batch_end(trainer, pl_module, None, None, trainer.global_step - 1)
            if trainer.should_stop:
                trainer.trace.append(("quit", trainer.global_step))
                break
    control.on_train_end(trainer, pl_module)
    control.teardown(trainer, pl_module, "fit")
    return trainer.trace
