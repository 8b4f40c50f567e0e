"""Building blocks that change a model's submodules: selection, swapping, presets, offloading.

What it is for: the torch-only machinery behind the module callbacks
(:class:`~lightning_utils.callbacks.ActivationOffload`, ``ReplaceModules``, ``CompileModules``),
usable on any ``nn.Module`` without a Trainer.

- ``targets``: which submodules a transform acts on (class, import path or predicate, plus an
  include/exclude name policy).
- ``swap``: replace matching submodules, carrying weights over under the same keys.
- ``presets``: ready replacements (torchao / bitsandbytes low-precision layers, SDPA attention).
- ``offload``: offloaded activation checkpointing (caches handed to a block are never written
  twice; an offloaded block's own forward can run compiled inside its checkpoint).

What it must never do: import ``lightning``, import an optional back end (torchao, bitsandbytes,
transformers) before a preset that needs it is called (Hugging Face caches are recognised
through ``sys.modules`` only), or load the compiler stack at import time.
"""
