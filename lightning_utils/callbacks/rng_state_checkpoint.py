"""``RNGStateCheckpoint``: save every rank's random-number-generator state with the checkpoint.

Lightning restores weights, optimizers, loops and data position, but not the global RNG state,
so a resumed run draws different dropout masks (and any other ``torch.rand``-style noise) from
the uninterrupted run. This callback records the torch CPU, CUDA, Python ``random`` and NumPy
states of every rank at each save (gathered, since only rank 0 writes the file) and puts each
rank's own state back when training resumes.

When it restores matters: the state is applied in ``on_train_start``, after Lightning has created
the train data iterator (creating one draws the DataLoader's base seed from the global RNG, at a
point where the uninterrupted run drew nothing; the sanity check runs under ``isolate_rng``) and
before the first batch is fetched (fetching may draw too: random augmentations in a
``num_workers=0`` dataset, an unsized loader's prefetch). The saved state is what the
uninterrupted run had at the end of the saved step, right before it fetched the next batch.

Exact for checkpoints saved at the end of a training step (``ModelCheckpoint(every_n_train_steps=N)``,
``TrainingControl``'s ``save``/``quit``), with or without gradient accumulation. Not replayed:
random draws the uninterrupted run made between the save and its next batch, i.e. a validation
run right after the saved step, and, for checkpoints saved at the end of an epoch, the next
epoch's new data iterator (its base seed; give the DataLoader its own ``generator`` to keep that
draw off the global RNG). An unsized loader's first batch after the resume was prefetched
before the restore.

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
        # One state per device visible when saving; a resume may see fewer devices (another
        # machine, CUDA_VISIBLE_DEVICES), and setting a missing one fails at CUDA init.
        # set_rng_state is lazy: it never initialises CUDA itself.
        saved = state["cuda"]
        for device in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(saved[device], device)
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

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A restored state that training never used (the resumed run had nothing left to do)
        # belongs to that checkpoint only, not to a later fit with this callback.
        self._states = None

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
        # Lightning has created the train data iterator by now (the DataLoader drew its base
        # seed from the global RNG) and fetches no batch before this hook; the uninterrupted
        # run fetched its next batch right after the save. So this is the one point where
        # both runs are about to draw the same numbers (fetching a batch may draw too, e.g.
        # random augmentations in a num_workers=0 dataset).
        states, self._states = self._states, None
        if not states:
            return
        rank, world_size = trainer.global_rank, trainer.world_size
        if len(states) != world_size:
            rank_zero_warn(
                f"RNGStateCheckpoint: the checkpoint holds RNG states for {len(states)} ranks but this run has "
                f"world_size={world_size}; ranks 0..{min(len(states), world_size) - 1} get their saved state back, "
                "the others keep their own seed, and the data split differs, so the random draws will not match "
                "an uninterrupted run"
            )
        if rank < len(states):
            _apply(states[rank])
