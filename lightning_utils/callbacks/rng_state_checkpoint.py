"""``RNGStateCheckpoint``: save every rank's random-number-generator state with the checkpoint.

Lightning restores weights, optimizers, loops and data position, but not the global RNG state,
so a resumed run draws different dropout masks (and any other ``torch.rand``-style noise) from
the uninterrupted run. This callback records the torch CPU, CUDA, Python ``random`` and NumPy
states of every rank at each save (gathered, since only rank 0 writes the file) and puts each
rank's own state back when training resumes.

When it restores matters: the state is applied at the first ``on_train_batch_start`` after the
restore, once the data iterator exists, because creating an iterator draws from the global RNG
(the DataLoader's base seed) at a point where the uninterrupted run drew nothing. The saved state
is what the uninterrupted run had at the end of the saved step, which is also what it had at the
start of the next one.

Stored as tensors and ints only, so ``.sft`` checkpoints hold it without pickle. It never seeds
anything itself and never touches a generator it was not given (samplers keep their own keyed
state). DataLoader worker processes are re-seeded by PyTorch from a new base seed on resume, so
randomness *inside workers* (random augmentations) is outside its reach.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn


def _collect() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    version, internal, gauss = random.getstate()
    state["python"] = {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}  # fmt: skip
    return state


def _apply(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    if "numpy" in state:
        import numpy as np

        npy = state["numpy"]
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))


class RNGStateCheckpoint(Callback):
    """Make a resumed run draw the same random numbers as the uninterrupted one.

    Add it to the Trainer's callbacks; it has no options. Resuming on a different world size
    restores the ranks that existed in the saved run and warns for the others.
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._states: list[dict[str, Any]] | None = None  # per rank, from the checkpoint
        self._pending: dict[str, Any] | None = None  # this rank's state, to apply at the next batch

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        # Collected here rather than in on_save_checkpoint: Lightning gathers callback state
        # dicts before it calls that hook. Every rank runs this while dumping a checkpoint.
        mine = _collect()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, mine)
            return {"ranks": gathered}
        return {"ranks": [mine]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._states = state_dict.get("ranks")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._states:
            return
        rank = trainer.global_rank
        if rank < len(self._states):
            self._pending = self._states[rank]
        else:
            rank_zero_warn(
                f"RNGStateCheckpoint: the checkpoint holds RNG states for {len(self._states)} ranks; "
                f"rank {rank} keeps its own seed, so its random draws differ from an uninterrupted run"
            )
        self._states = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            _apply(self._pending)
            self._pending = None
