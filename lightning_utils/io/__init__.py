"""Checkpoint and JSON I/O: ``.pt``/``.ckpt`` and ``.sft`` (safetensors) with parity.

>>> from lightning_utils.io import save_state, load_state
>>> save_state(checkpoint, "run/last.sft")      # whole state, one file, no pickle
>>> checkpoint = load_state("run/last.sft")     # the same object torch.load of a .pt gives

In a Trainer: ``Trainer(plugins=[SafetensorsCheckpointIO()])``. Writes are atomic and durable;
damaged files raise :class:`CheckpointFormatError`; nothing here ever unpickles a ``.sft``.
"""

from lightning_utils.io.atomic import atomic_write
from lightning_utils.io.checkpoint_io import AsyncCheckpointIO, SafetensorsCheckpointIO, ensure_safetensors_checkpoint_io
from lightning_utils.io.errors import CheckpointFormatError, UnsafeCheckpointError
from lightning_utils.io.jsonio import json_dumps, json_read, json_write
from lightning_utils.io.module_loading import check_strategy_writes_through_checkpoint_io, load_from_checkpoint
from lightning_utils.io.state import (
    SAFETENSORS_SUFFIXES,
    TORCH_SUFFIXES,
    checkpoint_format,
    load_state,
    save_state,
    save_weights,
)

__all__ = [
    "AsyncCheckpointIO",
    "CheckpointFormatError",
    "SAFETENSORS_SUFFIXES",
    "SafetensorsCheckpointIO",
    "TORCH_SUFFIXES",
    "UnsafeCheckpointError",
    "atomic_write",
    "check_strategy_writes_through_checkpoint_io",
    "ensure_safetensors_checkpoint_io",
    "checkpoint_format",
    "json_dumps",
    "json_read",
    "json_write",
    "load_from_checkpoint",
    "load_state",
    "save_state",
    "save_weights",
]
