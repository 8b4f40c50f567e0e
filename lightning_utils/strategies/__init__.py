"""Lightning strategies whose checkpoints go through the ``.sft`` CheckpointIO plugin.

* :class:`ModelParallelStrategy`: Lightning's FSDP2/TP strategy, a drop-in with the same
  arguments, that saves and resumes sharded (or consolidated) whole-state ``.sft`` checkpoints,
  resharding on load.

What it must never do: define a file format (that is :mod:`lightning_utils.io.sharded`'s job).
"""

from lightning_utils.strategies.model_parallel import ModelParallelStrategy

__all__ = ["ModelParallelStrategy"]
