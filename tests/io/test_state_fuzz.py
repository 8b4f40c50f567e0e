"""The loaders never crash, hang or over-allocate on bad input: one clear error type, naming the file."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_utils.io import CheckpointFormatError, UnsafeCheckpointError, load_state, save_state

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("valid") / "v.sft"
    base = torch.arange(6.0)
    save_state({"state_dict": {"w": torch.randn(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}, "views": [base[:2], base[2:]],
                "step": 3, "t": (1.5, None), "flag": torch.tensor([True, False])}, path)  # fmt: skip
    return path.read_bytes()


def _expect_clean(path):
    try:
        load_state(path)
    except CheckpointFormatError as exc:
        assert str(path) in str(exc)


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes(tmp_path, data):
    p = tmp_path / "r.sft"
    p.write_bytes(data)
    with pytest.raises(CheckpointFormatError, match="r.sft"):
        load_state(p)


@FUZZ
@given(data=st.data())
def test_mutated_bytes(tmp_path, valid_file, data):
    raw = bytearray(valid_file)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    p = tmp_path / "m.sft"
    p.write_bytes(bytes(raw))
    _expect_clean(p)


@FUZZ
@given(cut=st.integers(0, 10_000))
def test_truncated(tmp_path, valid_file, cut):
    p = tmp_path / "t.sft"
    p.write_bytes(valid_file[: cut % len(valid_file)])
    with pytest.raises(CheckpointFormatError, match="t.sft"):
        load_state(p)


@FUZZ
@given(n=st.integers(0, 2**64 - 1))
def test_lying_header_length(tmp_path, valid_file, n):
    p = tmp_path / "l.sft"
    p.write_bytes(struct.pack("<Q", n) + valid_file[8:])
    _expect_clean(p)


def _header(raw: bytes) -> dict:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def _with_header(raw: bytes, header: dict) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(data=st.data())
def test_lying_entries(tmp_path, valid_file, data):
    header = _header(valid_file)
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    header[name][field] = data.draw(
        st.one_of(
            json_values, st.lists(st.integers(-5, 2**63), max_size=4), st.sampled_from(["F32", "I64", "XX", "BOOL"])
        )
    )
    p = tmp_path / "e.sft"
    p.write_bytes(_with_header(valid_file, header))
    _expect_clean(p)


@FUZZ
@given(skeleton=json_values)
def test_garbage_skeleton(tmp_path, valid_file, skeleton):
    header = _header(valid_file)
    header["__metadata__"]["lightning_utils.skeleton"] = json.dumps(skeleton)
    p = tmp_path / "s.sft"
    p.write_bytes(_with_header(valid_file, header))
    _expect_clean(p)


@FUZZ
@given(data=st.data())
def test_mutated_skeleton_nodes(tmp_path, valid_file, data):
    header = _header(valid_file)
    skeleton = json.loads(header["__metadata__"]["lightning_utils.skeleton"])
    text = json.dumps(skeleton)
    # Replace one number or string token in the skeleton text by a random JSON value.
    tokens = [i for i, ch in enumerate(text) if ch in '0123456789"']
    i = data.draw(st.sampled_from(tokens))
    mutated = text[:i] + json.dumps(data.draw(json_values)) + text[i + 1 :]
    header["__metadata__"]["lightning_utils.skeleton"] = mutated
    p = tmp_path / "n.sft"
    p.write_bytes(_with_header(valid_file, header))
    _expect_clean(p)


def test_deeply_nested_header_is_rejected_cleanly(tmp_path):
    text = b"{" + b'"a":[' * 100_000
    p = tmp_path / "deep.sft"
    p.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(CheckpointFormatError, match="deep.sft"):
        load_state(p)


def test_huge_shape_is_rejected_before_allocating(tmp_path, valid_file):
    header = _header(valid_file)
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2**40, 2**40]
    p = tmp_path / "huge.sft"
    p.write_bytes(_with_header(valid_file, header))
    with pytest.raises(CheckpointFormatError, match="too large for a tensor"):
        load_state(p)
    header[name]["shape"] = [2**20, 2**20]  # fits int64, but not the bytes the offsets give
    p.write_bytes(_with_header(valid_file, header))
    with pytest.raises(CheckpointFormatError, match="needs"):
        load_state(p)


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_as_torch_file(tmp_path, data):
    p = tmp_path / "r.pt"
    p.write_bytes(data)
    with pytest.raises((CheckpointFormatError, UnsafeCheckpointError), match="r.pt"):
        load_state(p)


def test_truncated_torch_file(tmp_path):
    p = tmp_path / "x.ckpt"
    save_state({"w": torch.randn(100)}, p)
    raw = p.read_bytes()
    for cut in (0, 10, len(raw) // 2, len(raw) - 10):
        p.write_bytes(raw[:cut])
        with pytest.raises(CheckpointFormatError, match="x.ckpt"):
            load_state(p)
