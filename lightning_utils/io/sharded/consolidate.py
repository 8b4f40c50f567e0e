"""Turning a sharded checkpoint directory into one ``.sft`` or ``.ckpt`` file, one tensor at a time.

``.sft``: the index already has every global shape, so the header is written first and each
tensor is then assembled from its blocks, written and released before the next (peak memory:
one tensor). ``.ckpt``: ``torch.save`` needs every tensor as a storage, so the ``.sft`` is
written first beside the destination, memory-mapped (its pages belong to the page cache, not to
the process) and saved with ``torch.save``; the intermediate file is removed. Both writes are
atomic (at a URL: one upload that appears whole or not at all). This module never changes the
source directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from lightning_utils.io import storage as io_storage
from lightning_utils.io.atomic import TEMP_PREFIX
from lightning_utils.io.sharded import storage
from lightning_utils.io.sharded.reader import ShardedCheckpoint
from lightning_utils.io.sharded.stream import EntrySpec, write_entries


def consolidate(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Write the sharded checkpoint ``src`` as the single file ``dst`` (its suffix picks the format).

    Either may be an fsspec URL: a source is read with ranged reads, a ``.sft`` destination is one
    streamed upload. (A ``.ckpt`` destination at a URL has its intermediate ``.sft`` in the
    system's temporary directory, since ``torch.save`` reads it back whole.)
    """
    from lightning_utils.io.state import SKELETON_KEY, checkpoint_format, load_state
    from lightning_utils.io.torch_file import save_torch

    fmt = checkpoint_format(dst)
    if fmt == "torch":
        if io_storage.is_url(dst):
            with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as scratch_dir:
                scratch_file = Path(scratch_dir) / "consolidated.sft"
                consolidate(src, scratch_file)
                save_torch(load_state(scratch_file, mmap=True), dst)
            return
        dst = Path(dst)
        scratch = dst.parent / f"{TEMP_PREFIX}{storage.new_token()}.sft"
        try:
            consolidate(src, scratch)
            save_torch(load_state(scratch, mmap=True), dst)
        finally:
            storage.remove(scratch)
        return
    with ShardedCheckpoint(src) as checkpoint:

        def reader(name: str) -> EntrySpec:
            record = checkpoint.record(name)
            return EntrySpec(name, record.dtype, record.shape, lambda: checkpoint.read(name))

        specs = [reader(name) for name in checkpoint.index.tensors]
        skeleton = json.dumps(checkpoint.index.skeleton, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
        with io_storage.atomic_writer(dst) as f:
            write_entries(f, specs, {"format": "pt", SKELETON_KEY: skeleton})
