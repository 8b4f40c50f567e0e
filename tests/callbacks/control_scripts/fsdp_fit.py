"""TrainingControl and MetricsPrinter under ModelParallelStrategy (FSDP2 over 2 CPU gloo ranks),
for tests/callbacks/test_fsdp_training_control.py. Launched once per rank by the test.

``commands`` mode: a first fit driven by scheduled commands (``save@3``, ``eval@4``,
``export@5``) and by lines written into a command file while it runs (``lr 0.05``, then
``quit``), with a ModelCheckpoint(save_last="link"); then a second fit resumed with
``ckpt_path="last"`` and the same command file and schedules. Every rank writes, per fit, what
it did in order (saves, validations, exports: each a collective) to <out>/<fit>-rank<r>.json.

Rank 1's export fails with an OSError (a full disk): reported on every rank, training goes on.
Then, in the same processes, a third fit (``evalfail``) with an ``eval_fn`` (an all-reduce, then
a failure): ``eval@2`` fails on rank 1 only, ``eval@4`` on both ranks; each is reported and both
ranks train on to max_steps.

``fail-save`` / ``fail-export`` modes: the scheduled ``save@3`` fails writing on rank 0 (a full
disk), or ``export@3`` fails on rank 1 after gathering the weights; the run must end on both
ranks with that error (the test checks both outputs and the time it took).

usage: fsdp_fit.py OUT_DIR MODE
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

TESTS = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(TESTS / "callbacks"), str(TESTS)]  # a script run directly: no conftest puts them there

from control_scripts.recording_module import RecordingModuleWithVal  # noqa: E402 - needs the path above
from helpers.lightning import cpu_trainer  # noqa: E402 - needs the path above

from lightning_utils.callbacks.metrics_printer import MetricsPrinter  # noqa: E402
from lightning_utils.callbacks.training_control import TrainingControl  # noqa: E402
from lightning_utils.control.sources import FileSource  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class ShardedModule(RecordingModuleWithVal):
    """RecordingModuleWithVal on a 4 -> 8 -> 1 MLP, FSDP2-sharded over the data-parallel mesh."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        torch.manual_seed(0)
        self.layer = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.layer:
            if isinstance(module, torch.nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self.layer, mesh=mesh)


class Trace(Callback):
    """Records, in order, the collective work this rank took part in."""

    def __init__(self):
        self.events: list[list] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.events.append(["save", trainer.global_step])

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.events.append(["eval", trainer.global_step])


class GatheringExporter:
    """An exporter doing what an export of sharded weights does: gather every parameter (a
    collective), then (on rank 0) write. ``fail_on_rank`` raises there after the gathers."""

    def __init__(self, trace: Trace, out: Path, fail_on_rank: int | None = None, error: type[Exception] = RuntimeError):
        self.trace, self.out, self.fail_on_rank, self.error = trace, out, fail_on_rank, error

    def export(self, trainer, pl_module, state_dict=None):
        total = sum(float(p.full_tensor().sum()) for p in pl_module.parameters())  # collective gathers
        self.trace.events.append(["export", trainer.global_step])
        if trainer.global_rank == self.fail_on_rank:
            raise self.error(f"export exploded on rank {trainer.global_rank}")
        if not trainer.is_global_zero:
            return None
        path = self.out / f"weights-step={trainer.global_step}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(repr(total))
        return path


class FullDiskIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        raise OSError(28, "No space left on device")


class Typist(Callback):
    """Rank 0 writes into the command file, as a person would: ``lr 0.05`` at step 2, then ``quit``
    once the lr change has shown up."""

    def __init__(self, path: Path):
        self.path = path
        self.quit_sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        if step == 2:
            with open(self.path, "a") as f:
                f.write("lr 0.05\n")
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        if lr == 0.05 and not self.quit_sent and step >= 6:
            with open(self.path, "a") as f:
                f.write("quit\n")
            self.quit_sent = True


def fit(out: Path, name: str, max_steps: int, mode: str, ckpt_path: str | None = None) -> None:
    trace = Trace()
    commands = out / "commands.txt"
    fails = mode.startswith("fail-")
    control = TrainingControl(
        source=None if fails else FileSource(commands, poll_interval=0.02),
        commands=["save@3"]
        if mode == "fail-save"
        else ["export@3"]
        if mode == "fail-export"
        else ["save@3", "eval@4", "export@5"],
        save_on_export=False,
        # in "commands" mode rank 1's export hits a full disk: reported on every rank, training goes on
        exporter=GatheringExporter(trace, out / "export", fail_on_rank=1, error=RuntimeError if fails else OSError),
        signal=None,
    )
    callbacks = [control, trace, MetricsPrinter(path=out / f"{name}-metrics.jsonl", window=3)]
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    extra = {}
    if fails:
        strategy = ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
        if mode == "fail-save":
            extra["plugins"] = [FullDiskIO()]
    else:
        callbacks += [
            *([Typist(commands)] if name == "first" else []),
            ModelCheckpoint(dirpath=out / "ckpts", every_n_train_steps=100, save_last="link", save_top_k=-1),
        ]
    model = ShardedModule(sleep=0.05)
    trainer = cpu_trainer(
        out / "root",
        callbacks,
        max_steps=max_steps,
        devices=2,
        strategy=strategy,
        limit_val_batches=2,
        val_check_interval=10_000,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        **extra,
    )
    started = time.monotonic()
    try:
        trainer.fit(model, ckpt_path=ckpt_path)
    except Exception as err:
        print(f"RANK {trainer.global_rank} FAILED after {time.monotonic() - started:.1f}s: {err}", flush=True)
        raise
    (out / f"{name}-rank{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "global_step": trainer.global_step,
                "events": trace.events,
                "lr_trace": model.lr_trace,
                "val_steps": model.val_steps,
            }
        )
    )


class FailingEval:
    """An evaluation that takes part in a collective (a metric summed over ranks), then raises:
    at step 2 on rank 1 only, at step 4 on every rank."""

    def __init__(self, trace: Trace):
        self.trace = trace

    def __call__(self, trainer, pl_module):
        total = torch.ones(1)
        dist.all_reduce(total)  # every rank is here, at the same step
        step, rank = trainer.global_step, trainer.global_rank
        self.trace.events.append(["eval_fn", step, float(total)])
        if step == 2 and rank == 1:
            raise RuntimeError("eval exploded on rank 1 at step 2")
        if step == 4:
            raise (ValueError if rank == 0 else KeyError)(f"eval exploded on rank {rank} at step 4")


def fit_eval_fails(out: Path) -> None:
    trace = Trace()
    control = TrainingControl(source=None, commands=["eval@2", "eval@4"], eval_fn=FailingEval(trace), signal=None)
    model = ShardedModule(sleep=0.0)
    trainer = cpu_trainer(
        out / "evalfail-root",
        [control, trace],
        max_steps=6,
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        limit_val_batches=2,
        val_check_interval=10_000,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    trainer.fit(model)
    (out / f"evalfail-rank{trainer.global_rank}.json").write_text(
        json.dumps({"global_step": trainer.global_step, "events": trace.events, "lr_trace": model.lr_trace})
    )


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    if mode == "commands":
        (out / "commands.txt").write_text("")
        fit(out, "first", 40, mode)
        first = json.loads((out / f"first-rank{dist.get_rank()}.json").read_text())
        fit(out, "resumed", first["global_step"] + 4, mode, ckpt_path="last")
        fit_eval_fails(out)
    else:
        fit(out, "failing", 8, mode)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
