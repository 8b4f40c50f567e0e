"""``RNGStateCheckpoint``: save every rank's random-number-generator state with the checkpoint.

Lightning restores weights, optimizers, loops and data position, but not the global RNG state,
so a resumed run draws different dropout masks (and any other ``torch.rand``-style noise) from
the uninterrupted run. This callback records the torch CPU, CUDA, Python ``random`` and NumPy
states of every rank at each save (gathered, since only rank 0 writes the file) and puts each
rank's own state back when training resumes.

When it restores matters: the state is applied at the first ``on_train_batch_start`` after the
restore, once the first batch has been fetched, because creating a data iterator draws the
DataLoader's base seed from the global RNG at a point where the uninterrupted run drew nothing,
and some iterators (``ResumableDataLoader``'s) are created lazily, at their first batch. The saved
state is what the uninterrupted run had at the end of the saved step.

Validation during fit hands the global RNG back as it found it at the end of the training step
(as Lightning's ``isolate_rng`` does around the sanity check): a resumed run skips the validation
that followed the saved step, so its draws (its data iterator's seed included) must not move
training's random stream. With this callback, adding or removing validation therefore no longer
changes training's random numbers.

Exact for checkpoints saved at the end of a training step (``ModelCheckpoint(every_n_train_steps=N)``,
``TrainingControl``'s ``save``/``quit``) or of a validation (``ModelCheckpoint(monitor=...)``),
with or without gradient accumulation. Not exact:

* random numbers drawn from the global RNG *while fetching* the first batch after the resume
  (random augmentations in a ``num_workers=0`` dataset, an unsized loader's prefetch) come from
  the wrong state, and every later draw is offset by them; keep data randomness on the
  dataset's own generators or in worker processes;
* checkpoints saved at the end of an epoch when the DataLoader draws the next epoch's base seed
  from the global RNG (give it its own ``generator=`` to make those exact too).

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
    # The dict form: the same values as the legacy tuple that _apply hands back to set_state.
    npy = np.random.get_state(legacy=False)
    state["numpy"] = {
        "name": str(npy["bit_generator"]),
        "keys": torch.from_numpy(npy["state"]["key"].astype(np.int64)),
        "pos": int(npy["state"]["pos"]),
        "has_gauss": int(npy["has_gauss"]),
        "cached": float(npy["gauss"]),
    }
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
        np.random.set_state(
            (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
        )


class RNGStateCheckpoint(Callback):
    """Make a resumed run draw the same random numbers as the uninterrupted one.

    Add it to the Trainer's callbacks; it has no options. Resuming on a different world size
    restores the ranks that existed in the saved run (warning that the draws will differ).
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._states: list[dict[str, Any]] | None = None  # per rank, from the checkpoint
        self._pending: dict[str, Any] | None = None  # this rank's state, to apply at the next batch
        self._torch_after_step: torch.Tensor | None = None  # torch CPU state at the end of the last batch
        self._before_validation: dict[str, Any] | None = None  # the state to give back after validation

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A restored state that training never used (the resumed run had nothing left to do)
        # belongs to that checkpoint only, not to a later fit with this callback.
        self._states = self._pending = self._torch_after_step = self._before_validation = None

    def state_dict(self) -> dict[str, Any]:
        # Collected here rather than in on_save_checkpoint: Lightning gathers callback state
        # dicts before it calls that hook. Every rank runs this while dumping a checkpoint.
        mine = _collect()
        trainer = self._trainer
        if (
            trainer is not None
            and trainer.world_size > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, mine)
            return {"ranks": gathered}
        return {"ranks": [mine]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._states = state_dict.get("ranks")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
            self._pending = states[rank]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # After the first fetch: a lazily created data iterator has drawn its base seed by now.
        if self._pending is not None:
            _apply(self._pending)
            self._pending = None
        self._torch_after_step = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The torch CPU state as the step left it (a 5 kB copy): a validation right after this
        # step creates its data iterator, drawing a base seed, before on_validation_start runs.
        self._torch_after_step = torch.get_rng_state()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        state = _collect()
        if self._torch_after_step is not None:  # undo the validation iterator's seed draw too
            state["torch"] = self._torch_after_step
        self._before_validation = state

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before ModelCheckpoint's on_validation_end (checkpoint callbacks run last), so a save
        # at validation end records the state training continues from.
        state, self._before_validation = self._before_validation, None
        if state is not None:
            _apply(state)
