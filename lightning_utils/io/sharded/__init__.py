"""Sharded ``.sft`` checkpoints: one safetensors file per rank plus a JSON index, no pickle.

A training state whose tensors are sharded over ranks (``DTensor`` weights and optimizer moments
under FSDP2) is saved as a directory::

    step=100.sft/
      shard-00000-of-00002.safetensors   rank 0's blocks (and the tensors that are not sharded)
      shard-00001-of-00002.safetensors   rank 1's blocks
      index.json                         every global tensor's blocks, and the JSON skeleton

Each rank writes its own file in parallel; the directory is staged beside its final name and
published in one rename once every rank's file is durable, so it appears complete or not at all.
Reading takes any slice of any tensor from the files' memory maps, so a checkpoint saved on N
ranks loads on M. At an fsspec URL (``s3://bucket/run/step=100.sft``), where nothing can be
renamed, each rank uploads its file under the final prefix with a name unique to the save, the
index is uploaded last and publishes them, and reads are ranged reads of exactly the bytes a rank
needs. The layout is written down in ``docs/sft-format.md``.

* :func:`save_sharded` / :func:`save_consolidated`: save (every rank calls them; ``comm`` runs
  the few collectives, :class:`ProcessGroupComm` on a ``torch.distributed`` group).
* :class:`ShardedCheckpoint`: read slices, the whole object, or its structure;
  :func:`load_sharded` is ``load_state`` of a directory.
* :func:`fill`: copy the slice a ``DTensor`` (or a tensor) holds from a loaded checkpoint.
* :func:`consolidate`: one ``.sft``/``.ckpt`` file from a directory, one tensor at a time.

This package is torch only: it must never import Lightning, and never write pickles.
"""

from lightning_utils.io.sharded.comm import Comm, ProcessGroupComm
from lightning_utils.io.sharded.consolidate import consolidate
from lightning_utils.io.sharded.layout import INDEX_NAME, shard_file_name
from lightning_utils.io.sharded.reader import (
    ShardedCheckpoint,
    checkpoint_root,
    is_sharded_checkpoint,
    load_sharded,
    load_sharded_structure,
)
from lightning_utils.io.sharded.shards import TensorShard, fill, host_copies, local_block, to_shards
from lightning_utils.io.sharded.writer import save_consolidated, save_sharded

__all__ = [
    "INDEX_NAME",
    "Comm",
    "ProcessGroupComm",
    "ShardedCheckpoint",
    "TensorShard",
    "checkpoint_root",
    "consolidate",
    "fill",
    "host_copies",
    "is_sharded_checkpoint",
    "load_sharded",
    "load_sharded_structure",
    "local_block",
    "save_consolidated",
    "save_sharded",
    "shard_file_name",
    "to_shards",
]
