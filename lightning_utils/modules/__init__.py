"""Building blocks that change a model's submodules: selection, swapping, presets, offloading.

What it is for: the torch-only machinery behind the module callbacks
(:class:`~lightning_utils.callbacks.ActivationOffload`, ``ReplaceModules``, ``CompileModules``),
usable on any ``nn.Module`` without a Trainer.

- ``targets``: which submodules a transform acts on (class, import path or predicate, plus an
  include/exclude name policy).
- ``swap``: replace matching submodules, carrying weights over under the same keys.
- ``presets``: ready replacements (torchao / bitsandbytes low-precision layers, SDPA attention).
- ``offload``: offloaded activation checkpointing.

What it must never do: import ``lightning``, or import an optional back end (torchao,
bitsandbytes) before a preset that needs it is called.
"""
