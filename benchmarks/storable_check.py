"""What the ``.sft`` check at fit start costs, and what format version 2 costs the encoder.

    python benchmarks/storable_check.py [--params 100e6] [--small 3000] [--repeat 5]

Two Lightning-style checkpoints with AdamW state: a big one (``--params`` in 2048x2048 Linear
layers, few large tensors) and one of many small tensors (``--small`` Linear(16, 16) layers, the
per-object cost). Their hparams hold numpy scalars and arrays, a ``Namespace``, an enum and a
dataclass. Measured in one run, the methods interleaved within each repeat (median):

* ``check_storable(checkpoint)``: what ``SafetensorsModelCheckpoint`` runs when fit starts,
  against ``save_state(.sft)`` of the same checkpoint (the first save, which the check replaces
  as the place a bad value is found);
* ``encode(checkpoint)`` (the skeleton and the tensor entries, no file) against the version-1
  encoder of ``lightning_utils`` 0.2 (``skeleton.py`` at the commit given by ``--base``, read
  with ``git show``), on the same checkpoint with hparams that version 1 can hold.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from checkpoint_io import build_checkpoint  # benchmarks/checkpoint_io.py (the script's folder is on sys.path)

from lightning_utils.io import check_storable, save_state
from lightning_utils.io.skeleton import encode

ROOT = Path(__file__).resolve().parents[1]


class Act(enum.Enum):
    GELU = "gelu"


@dataclasses.dataclass
class Sched:
    warmup: int = 100
    decay: float = 0.5


def small_checkpoint(layers: int) -> dict[str, Any]:
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return {
        "epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.6.6", "state_dict": model.state_dict(),
        "optimizer_states": [opt.state_dict()], "lr_schedulers": [], "callbacks": {}, "hyper_parameters": {},
    }  # fmt: skip


def v2_hparams() -> dict[str, Any]:
    return {
        "lr": np.float32(3e-4), "mask": np.arange(64, dtype=np.int64), "args": argparse.Namespace(seed=0, name="run"),
        "act": Act.GELU, "sched": Sched(),
    }  # fmt: skip


def old_encoder(base: str) -> Any:
    source = subprocess.run(
        ["git", "show", f"{base}:lightning_utils/io/skeleton.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    spec = importlib.util.spec_from_loader("skeleton_v1", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, "skeleton_v1.py", "exec"), module.__dict__)
    return module.encode


def median_times(methods: dict[str, Any], repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeat):
        for name, run in methods.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--small", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--base", default="c3c42fb", help="commit whose skeleton.py is the version-1 encoder")
    args = parser.parse_args()
    encode_v1 = old_encoder(args.base)
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        for label, checkpoint in (
            (f"{args.params / 1e6:.0f}M params", build_checkpoint(args.params)),
            (f"{args.small} small layers", small_checkpoint(args.small)),
        ):
            v1_hparams = dict(checkpoint["hyper_parameters"])
            checkpoint["hyper_parameters"] = {**v1_hparams, **v2_hparams()}
            v1_checkpoint = {**checkpoint, "hyper_parameters": v1_hparams}
            n_tensors = len(encode(checkpoint)[0])
            t = median_times(
                {
                    "check": lambda c=checkpoint: check_storable(c),
                    "save": lambda c=checkpoint: save_state(c, Path(tmp) / "c.sft"),
                    "encode v2": lambda c=v1_checkpoint: encode(c),
                    "encode v1": lambda c=v1_checkpoint: encode_v1(c),
                },
                args.repeat,
            )
            print(f"{label} ({n_tensors} entries), median of {args.repeat}:")
            print(f"  check_storable        {t['check'] * 1e3:9.1f} ms  = {t['check'] / t['save']:.4f}x a save")
            print(f"  save_state(.sft)      {t['save'] * 1e3:9.1f} ms")
            print(
                f"  encode, this version  {t['encode v2'] * 1e3:9.1f} ms  = {t['encode v2'] / t['encode v1']:.2f}x "
                f"the version-1 encoder ({t['encode v1'] * 1e3:.1f} ms)"
            )


if __name__ == "__main__":
    sys.exit(main())
