"""``SafetensorsModelCheckpoint``: Lightning's ``ModelCheckpoint`` writing ``.sft`` files.

Every feature of ``ModelCheckpoint`` (``every_n_train_steps``, ``save_top_k``, ``save_last``,
``ckpt_path="last"``) works unchanged; only the file extension differs. At setup it makes sure
the trainer writes through :class:`~lightning_utils.plugins.SafetensorsCheckpointIO` (installing it
in place of Lightning's default) and refuses strategies that bypass the plugin (FSDP, DeepSpeed,
Lightning's own ``ModelParallelStrategy``, naming :class:`lightning_utils.strategies.ModelParallelStrategy`
as the drop-in that writes sharded ``.sft`` directories), so a ``.sft`` name never holds a pickle.
It must never define how a file is written (that is the plugin's job).
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_utils.plugins.checkpoint_io import ensure_safetensors_checkpoint_io
from lightning_utils.strategies.model_parallel import check_strategy_saves_sft


class SafetensorsModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose files are whole-state ``.sft`` checkpoints."""

    FILE_EXTENSION = ".sft"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy_saves_sft(trainer.strategy, self.FILE_EXTENSION)
        ensure_safetensors_checkpoint_io(trainer.strategy)
        super().setup(trainer, pl_module, stage)
