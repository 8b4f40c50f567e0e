"""Checkpoint and JSON I/O: ``.pt``/``.ckpt`` and ``.sft`` (safetensors) with parity.

>>> from lightning_utils.io import save_state, load_state
>>> save_state(checkpoint, "run/last.sft")      # whole state, one file, no pickle
>>> checkpoint = load_state("run/last.sft")     # the same object torch.load of a .pt gives

In a Trainer: ``Trainer(plugins=[lightning_utils.plugins.SafetensorsCheckpointIO()])``. Paths
may be fsspec URLs (``s3://``, ``gs://``, ``az://``...; :mod:`lightning_utils.io.storage`). Writes
are atomic (and durable, locally); damaged files raise :class:`CheckpointFormatError`, a save
with no room :class:`DiskFullError`, a failed upload :class:`CheckpointWriteError`; nothing here
ever unpickles a ``.sft``. This package is torch only: it must never import ``lightning``.
"""

from typing import Any

from lightning_utils.io.atomic import atomic_write
from lightning_utils.io.errors import CheckpointFormatError, CheckpointWriteError, DiskFullError, UnsafeCheckpointError
from lightning_utils.io.jsonio import json_dumps, json_read, json_write
from lightning_utils.io.skeleton import check_storable
from lightning_utils.io.state import (
    SAFETENSORS_SUFFIXES,
    TORCH_SUFFIXES,
    checkpoint_format,
    load_state,
    save_state,
    save_weights,
)

__all__ = [
    "SAFETENSORS_SUFFIXES",
    "TORCH_SUFFIXES",
    "CheckpointFormatError",
    "CheckpointWriteError",
    "DiskFullError",
    "UnsafeCheckpointError",
    "atomic_write",
    "check_storable",
    "checkpoint_format",
    "json_dumps",
    "json_read",
    "json_write",
    "load_state",
    "save_state",
    "save_weights",
]

# The Lightning adapters that lived here until they moved to lightning_utils.plugins.
_MOVED_TO_PLUGINS = frozenset(
    {
        "AsyncCheckpointIO",
        "SafetensorsCheckpointIO",
        "check_strategy_writes_through_checkpoint_io",
        "ensure_safetensors_checkpoint_io",
        "load_from_checkpoint",
    }
)


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_PLUGINS:
        from lightning_utils import _compat, plugins

        _compat.warn_moved(f"lightning_utils.io.{name}", f"lightning_utils.plugins.{name}")
        return getattr(plugins, name)
    raise AttributeError(f"module 'lightning_utils.io' has no attribute {name!r}")
