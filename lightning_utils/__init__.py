"""lightning-utils: drop-in PyTorch Lightning components for training large sequence models.

The package root stays import-light: it imports nothing heavy until a name is used. The public
pieces live in their own modules (``lightning_utils.io``, ``lightning_utils.data.samplers``,
``lightning_utils.optim``, ``lightning_utils.callbacks``, ``lightning_utils.patterns``,
``lightning_utils.distributed``); the most used names are re-exported here lazily. Modules that
moved keep their old import path for one release (see ``lightning_utils._compat``).
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_utils import _compat

_compat.install()

__version__ = "0.2.0"

# name -> module that defines it; resolved on first access (PEP 562).
_LAZY = {
    "save_state": "lightning_utils.io",
    "load_state": "lightning_utils.io",
    "SafetensorsCheckpointIO": "lightning_utils.plugins",
    "DelayedPatternProvider": "lightning_utils.patterns",
    "PoolSampler": "lightning_utils.data.samplers",
    "OrderedSampler": "lightning_utils.data.samplers",
    "BatchedOrderedSampler": "lightning_utils.data.samplers",
    "RandomSampler": "lightning_utils.data.samplers",
    "ResumableDataLoader": "lightning_utils.data",
    "Apollo": "lightning_utils.optim",
    "ApolloMini": "lightning_utils.optim",
    "WarmupLR": "lightning_utils.optim",
    "NoamLR": "lightning_utils.optim",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_utils' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
