"""Offloaded activation checkpointing: keep only a block's inputs, on the host, and recompute.

What it is for: ``apply_activation_offload(model, Block)`` makes every ``Block`` of ``model`` run
without keeping its activations: its forward runs under ``no_grad``, its tensor inputs are saved
(copied to pinned host memory when they live on CUDA), and backward reloads them, replays the
forward's RNG and autocast state and recomputes the block with grad enabled. Gradients equal
those of the plain model. ``offloaded_checkpoint(fn, *args, **kwargs)`` does the same for one
call of a function. Parameters, buffers and state-dict keys are untouched. The parts:

- :mod:`.pytree`: the tensors inside a call's arguments and output, flattened out and put back;
- :mod:`.host_copy`: host copies on a CUDA side stream, their events, and prefetch in backward;
- :mod:`.function`: the autograd function (save, recompute with RNG/autocast replay, gradients);
- :mod:`.caches`: caches handed to a block, which a recompute must never write into again;
- :mod:`.wrap`: making matching submodules run that way (apply, remove, ``is_offloaded``, and
  ``compile_offloaded``: the block's forward compiled inside the checkpoint).

What it must never do: import ``lightning``, offload parameters or buffers, change a module's
state dict, recompute when nothing needs a gradient, or keep a reference to a block's
intermediate activations.
"""

from __future__ import annotations

from lightning_utils.modules.offload.function import GraphCheck, OffloadOptions, offloaded_checkpoint
from lightning_utils.modules.offload.wrap import _OffloadedForward as _OffloadedForward
from lightning_utils.modules.offload.wrap import (
    apply_activation_offload,
    compile_offloaded,
    is_offload_compiled,
    is_offloaded,
    remove_activation_offload,
)

__all__ = [
    "OffloadOptions",
    "apply_activation_offload",
    "compile_offloaded",
    "is_offload_compiled",
    "is_offloaded",
    "offloaded_checkpoint",
    "remove_activation_offload",
]

# The names that pickles of offloaded models written before this package was split refer to
# (``lightning_utils.offload._OffloadedForward`` and its ``_GraphCheck``): they must keep loading.
_GraphCheck = GraphCheck
