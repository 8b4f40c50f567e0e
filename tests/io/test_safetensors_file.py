"""The safetensors container (:mod:`lightning_utils.io.safetensors_file`): headers are validated before
anything is allocated, foreign files read correctly, and safetensors reads ours byte for byte."""

from __future__ import annotations

import json
import math
import pathlib
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_utils.io import CheckpointFormatError, load_state, save_weights
from lightning_utils.io.state import load_structure


def _raw_sft(path: pathlib.Path, header: dict, data: bytes = b"") -> pathlib.Path:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "shape", [[0, 2**64], [0, 2**62, 2**62], [2**63]], ids=["overflow-int64", "overflow-strides", "int64-max-plus"]
)
def test_crafted_shapes_raise_checkpoint_format_error(tmp_path, shape):
    """A header shape with a zero dimension passes the size check (its product is 0) but may hold
    dimensions torch cannot represent; load_state and load_structure raise CheckpointFormatError
    naming the file, not a raw error from ``torch.empty``."""
    nbytes = 0 if 0 in shape else 4 * math.prod(shape)
    p = _raw_sft(tmp_path / "crafted.sft", {"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}})
    for load in (load_state, load_structure):
        with pytest.raises(CheckpointFormatError, match="crafted.sft"):
            load(p)


def test_unaligned_foreign_entries_are_read_correctly(tmp_path):
    """A foreign file whose entries are not aligned to their dtype (older writers) falls back
    from the zero-copy mmap path to a read; values must be right either way."""
    a, b = torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([1.5, -2.25], dtype=torch.float32)
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
    }
    p = _raw_sft(tmp_path / "u.safetensors", header, a.numpy().tobytes() + b.numpy().tobytes())
    for mm in (True, False):
        out = load_state(p, mmap=mm)
        assert torch.equal(out["a"], a) and torch.equal(out["b"], b)


def test_files_from_safetensors_every_dtype_and_ours_read_back_by_safetensors(tmp_path):
    tensors = {
        "f64": torch.randn(2, dtype=torch.float64), "bf16": torch.randn(3).bfloat16(), "f16": torch.randn(1).half(),
        "i8": torch.tensor([-1, 2], dtype=torch.int8), "u8": torch.tensor([255], dtype=torch.uint8),
        "b": torch.tensor([True, False]), "e4m3": torch.randn(4).to(torch.float8_e4m3fn),
        "c64": torch.randn(2, dtype=torch.complex64), "empty": torch.empty(0, 3), "scalar": torch.tensor(7),
    }  # fmt: skip
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    ours = load_state(tmp_path / "theirs.safetensors")
    assert set(ours) == set(tensors)
    for k, t in tensors.items():
        assert ours[k].dtype == t.dtype and ours[k].shape == t.shape
        assert torch.equal(ours[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k
    save_weights(ours, tmp_path / "ours.safetensors", metadata={"stats": {"step": 1}})
    back = load_file(tmp_path / "ours.safetensors")
    for k, t in tensors.items():
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k
