"""A real Trainer.fit driven by TrainingControl, for subprocess tests (stdin, file, DDP).

Each rank writes <out>/rank<r>.json: its global_step at the end, the (step, lr) after every
optimizer step, the steps at which eval_fn ran, and what lightning_utils.distributed reported
before and after the process group existed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

from lightning_utils import distributed
from lightning_utils.callbacks.export_weights import ExportWeights
from lightning_utils.callbacks.metrics_printer import MetricsPrinter
from lightning_utils.callbacks.training_control import TrainingControl

TESTS = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(TESTS / "callbacks"), str(TESTS)]  # a script run directly: no conftest puts them there

from control_scripts.recording_module import RecordingModule, RecordingModuleWithVal  # noqa: E402 - needs the path above
from helpers.lightning import cpu_trainer  # noqa: E402 - needs the path above

# Read when the script starts: the launcher's environment, long before fit creates the process group.
BEFORE_INIT = {
    "global_rank": distributed.global_rank(),
    "world_size": distributed.world_size(),
    "initialized": distributed.distributed_is_initialized(),
}


class Dump(Callback):
    def __init__(self, out: Path):
        self.out = out
        self.after_init: dict = {}

    def on_train_start(self, trainer, pl_module):
        self.after_init = {
            "global_rank": distributed.global_rank(),
            "world_size": distributed.world_size(),
            "initialized": distributed.distributed_is_initialized(),
            "broadcast": distributed.broadcast_object(f"from rank {trainer.global_rank}"),
            # objects of different sizes on each rank
            "gathered": distributed.all_gather_object(
                {"from": trainer.global_rank, "pad": "x" * 100 * trainer.global_rank}
            ),
        }

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(
            json.dumps(
                {
                    "rank": trainer.global_rank,
                    "global_step": trainer.global_step,
                    "lr_trace": pl_module.lr_trace,
                    "evals": pl_module.evals,
                    "val_steps": pl_module.val_steps,
                    "before_init": BEFORE_INIT,
                    "after_init": self.after_init,
                    "checkpoints": sorted(p.name for p in (Path(trainer.default_root_dir) / "checkpoints").glob("*")),
                }
            )
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--source", default="stdin")
    p.add_argument("--print-steps", action="store_true")
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--lightning-val", action="store_true", help="'eval' runs the model's validation loop")
    p.add_argument("--export-on-quit", action="store_true", help="quit also exports (then train end finds it done)")
    args = p.parse_args()
    root = Path(args.root)
    model = (RecordingModuleWithVal if args.lightning_val else RecordingModule)(
        sleep=args.sleep, print_steps=args.print_steps
    )
    control = TrainingControl(
        source=None if args.source == "none" else args.source,
        save_every_n_steps=args.save_every,
        export_on_quit=args.export_on_quit,
        eval_fn=None if args.lightning_val else (lambda trainer, module: module.evals.append(trainer.global_step)),
    )
    ddp = {"strategy": "ddp", "devices": 2} if args.devices == 2 else {"devices": 1}
    val = {
        "limit_val_batches": 2,
        "val_check_interval": 10_000,
        "check_val_every_n_epoch": None,
        "num_sanity_val_steps": 0,
    }
    callbacks = [
        control,
        Dump(root / "out"),
        MetricsPrinter(path=root / "metrics.jsonl", window=5),
        ExportWeights(dirpath=root / "export", dtype="bf16"),
    ]
    trainer = cpu_trainer(root, callbacks, max_steps=args.max_steps, **ddp, **val)
    trainer.fit(model)
    if trainer.is_global_zero:
        print(f"FIT RETURNED {trainer.global_step}", flush=True)
    # Tear the gloo group down before the interpreter exits: left to exit-time destructors, its
    # worker threads sometimes abort the process ("terminate called without an active exception").
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
