"""``SafetensorsModelCheckpoint``: Lightning's ``ModelCheckpoint`` writing ``.sft`` files.

Every feature of ``ModelCheckpoint`` (``every_n_train_steps``, ``save_top_k``, ``save_last``,
``ckpt_path="last"``) works unchanged; only the file extension differs. ``dirpath`` may be an
fsspec URL (``s3://bucket/run``): saves, top-k removals and ``ckpt_path="last"`` all work there
(Lightning's own lookup of ``last`` loses the URL scheme; this class keeps it). At setup it makes sure
the trainer writes through :class:`~lightning_utils.plugins.SafetensorsCheckpointIO` (installing it
in place of Lightning's default) and refuses strategies that bypass the plugin (FSDP, DeepSpeed,
Lightning's own ``ModelParallelStrategy``, naming :class:`lightning_utils.strategies.ModelParallelStrategy`
as the drop-in that writes sharded ``.sft`` directories), so a ``.sft`` name never holds a pickle.
When ``fit`` starts it checks that a ``.sft`` can hold the run's state (hyperparameters at setup,
then callback, optimizer and scheduler state), so a value it cannot hold fails before the first
step instead of at the first save. It must never define how a file is written (that is the
plugin's job).
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_utils._internals import last_checkpoint_urls
from lightning_utils.plugins.checkpoint_io import ensure_safetensors_checkpoint_io
from lightning_utils.plugins.module_loading import check_strategy_writes_through_checkpoint_io
from lightning_utils.plugins.storable import check_checkpoint_storable


class SafetensorsModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose files are whole-state ``.sft`` checkpoints."""

    FILE_EXTENSION = ".sft"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy_writes_through_checkpoint_io(trainer.strategy, self.FILE_EXTENSION)
        ensure_safetensors_checkpoint_io(trainer.strategy)
        if stage == "fit":  # the hyperparameters, before configure_model builds anything big
            check_checkpoint_storable(trainer, type(self).__name__, weights_only=True)
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Callbacks are restored and the optimizers built by now; the first step has not run.
        check_checkpoint_storable(trainer, type(self).__name__, weights_only=self.save_weights_only)
        super().on_fit_start(trainer, pl_module)

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        return last_checkpoint_urls(self, trainer)
