"""Lightning callbacks, one class per module (as in ``lightning.pytorch.callbacks``).

Names are resolved lazily so that importing one callback never imports the optional back ends
of another.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SafetensorsModelCheckpoint": "lightning_utils.callbacks.safetensors_model_checkpoint",
    "ActivationOffload": "lightning_utils.callbacks.activation_offload",
    "ReplaceModules": "lightning_utils.callbacks.replace_modules",
    "CompileModules": "lightning_utils.callbacks.compile_modules",
    "TrainingControl": "lightning_utils.callbacks.training_control",
    "ExportWeights": "lightning_utils.callbacks.export_weights",
    "MetricsPrinter": "lightning_utils.callbacks.metrics_printer",
    "RNGStateCheckpoint": "lightning_utils.callbacks.rng_state_checkpoint",
    "ControlError": "lightning_utils.callbacks.training_control",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_utils.callbacks' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
