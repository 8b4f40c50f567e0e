"""Lightning Trainer plugins for checkpoints, and loading a LightningModule from any checkpoint.

What it is for: the Lightning side of :mod:`lightning_utils.io`.

- :class:`SafetensorsCheckpointIO`: ``Trainer(plugins=[SafetensorsCheckpointIO()])``; every
  checkpoint the trainer writes or reads goes through :func:`lightning_utils.io.save_state` /
  :func:`~lightning_utils.io.load_state`, so the suffix (``.sft`` or ``.ckpt``) picks the format.
- :class:`AsyncCheckpointIO`: Lightning's asynchronous wrapper, with removals queued behind saves.
- :class:`SafetensorsLoadMixin`: ``class MyModule(SafetensorsLoadMixin, pl.LightningModule)`` makes
  ``MyModule.load_from_checkpoint`` read ``.sft`` files too.
- :func:`load_from_checkpoint`: ``LightningModule.load_from_checkpoint`` for ``.sft`` files, for
  any module class.
- :func:`check_checkpoint_storable`: when ``fit`` starts, fail for state a ``.sft`` cannot hold.

What it must never do: define a file format (that is :mod:`lightning_utils.io`'s job).
"""

from lightning_utils.plugins.checkpoint_io import (
    AsyncCheckpointIO,
    SafetensorsCheckpointIO,
    ensure_safetensors_checkpoint_io,
)
from lightning_utils.plugins.module_loading import (
    SafetensorsLoadMixin,
    check_strategy_writes_through_checkpoint_io,
    load_from_checkpoint,
)
from lightning_utils.plugins.storable import check_checkpoint_storable

__all__ = [
    "AsyncCheckpointIO",
    "SafetensorsCheckpointIO",
    "SafetensorsLoadMixin",
    "check_checkpoint_storable",
    "check_strategy_writes_through_checkpoint_io",
    "ensure_safetensors_checkpoint_io",
    "load_from_checkpoint",
]
