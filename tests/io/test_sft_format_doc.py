"""``docs/sft-format.md`` describes the format the code writes and reads: every skeleton tag and tensor
field, the version, the metadata keys and dtypes, and its worked example byte for byte."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import itertools
import json
import math
import pathlib
import re
import struct

import numpy as np
import pytest
import torch
import transformers
from lightning.fabric.utilities.data import AttributeDict

from lightning_utils.io import load_state, save_state
from lightning_utils.io.safetensors_file import _DTYPE_NAMES
from lightning_utils.io.skeleton import FORMAT_VERSION, TAGS, V2_TAGS, SkeletonError, decode, encode
from lightning_utils.io.state import JSON_KEYS_KEY, SKELETON_KEY

DOC = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "sft-format.md").read_text()


def _section(number: int) -> str:
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", DOC, re.MULTILINE | re.DOTALL)
    assert match, f"docs/sft-format.md has no section {number}"
    return match.group(0)


def _first_cells(section: str) -> list[str]:
    """The backquoted first cell of every table row of ``section``."""
    return re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE)


def _code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section, re.MULTILINE | re.DOTALL)


class _Color(enum.Enum):
    RED = 1


@dataclasses.dataclass
class _Config:
    lr: float = 0.1


def _every_kind() -> dict:
    """An object whose skeleton holds every tag and every tensor field."""
    shared = [1, 2]
    p = torch.nn.Parameter(torch.ones(2))
    p.no_decay = True
    base = torch.arange(4, dtype=torch.int32)
    c = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    odict = collections.OrderedDict(w=torch.zeros(1))
    odict._metadata = {"": {"version": 1}}
    return {
        "dict": {1: "non-str key"},
        "odict": odict,
        "attrdict": AttributeDict(lr=0.1),
        "shared": shared,
        "again": (shared,),
        "set": {1},
        "frozenset": frozenset({2}),
        "float": math.nan,
        "int": 2**9000,
        "complex": 1 + 2j,
        "bytes": b"\x00",
        "path": pathlib.PurePosixPath("/data"),
        "size": torch.Size([2]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "param": p,
        "param_again": p,
        "frozen": torch.ones(1, requires_grad=True),
        "views": {"i": base, "f": base.view(torch.float32)[1:3]},
        "conj": {"c": c.conj(), "imag": c.conj().imag},
        "transposed": torch.randn(3, 2).t(),
        # version 2
        "npscalar": np.float32(0.5),
        "ndarray": np.arange(3),
        "namespace": argparse.Namespace(a=1),
        "dataclass": _Config(),
        "enum": _Color.RED,
        "hfconfig": transformers.GPT2Config(
            n_layer=1, n_embd=8, n_head=2, vocab_size=16, bos_token_id=0, eos_token_id=0
        ),
    }


def _walk(node, tags: set[str], fields: set[str]) -> None:
    """Collect the tags of every node under ``node``, and the fields of its tensor nodes."""
    if isinstance(node, list):
        for v in node:
            _walk(v, tags, fields)
        return
    if not isinstance(node, dict):
        return
    tags.add(node["$"])
    if node["$"] == "tensor":
        fields.update(k for k in node if k != "$")
        children = [node.get("attrs")]
    elif node["$"] in ("ndarray", "enum", "hfconfig"):
        children = [node["v"]]
    elif isinstance(node.get("v"), dict):  # a dict-like node with str keys: {key: node}
        children = [*node["v"].values(), node.get("meta")]
    else:
        children = [v for k, v in node.items() if k not in ("$", "id")]
    for child in children:
        _walk(child, tags, fields)


def test_the_documented_version_is_the_code_version():
    assert {int(v) for v in re.findall(r"`FORMAT_VERSION = (\d+)`", DOC)} == {FORMAT_VERSION} == {2}
    assert f'{{"version": {FORMAT_VERSION}, "root"' in _section(3)
    assert all(f"`{tag}`" in _section(6) for tag in V2_TAGS)  # the versioning section lists what 2 added


def test_each_file_is_written_with_the_lowest_version_that_holds_its_tags():
    """The versioning rule of section 6: a file without version-2 tags is a version-1 file; each
    version-2 tag alone makes it version 2; a version-1 skeleton with a version-2 tag is refused."""
    every = _every_kind()
    version_1 = {k: v for k, v in every.items() if k not in V2_TAGS}
    assert encode(version_1)[1]["version"] == 1
    for tag in V2_TAGS:
        entries, skeleton = encode({"x": every[tag]})
        assert skeleton["version"] == 2, tag
        skeleton["version"] = 1
        with pytest.raises(SkeletonError, match="version 1"):
            decode(skeleton, lambda name, device, entries=entries: entries[name])


def test_the_tag_table_lists_every_tag_the_encoder_emits_and_the_decoder_accepts(tmp_path):
    documented = _first_cells(_section(4))
    assert len(documented) == len(set(documented)) == 23
    assert set(documented) == TAGS
    version_2_table = _section(4).split("**Added in version 2")[1]
    assert set(_first_cells(version_2_table)) == V2_TAGS
    obj = _every_kind()
    tags: set[str] = set()
    _walk(encode(obj)[1]["root"], tags, set())
    assert tags == TAGS  # every tag is emitted...
    save_state(obj, tmp_path / "all.sft")
    out = load_state(tmp_path / "all.sft")  # ...and decoded
    assert type(out["attrdict"]) is AttributeDict and out["again"][0] is out["shared"]
    assert type(out["namespace"]) is argparse.Namespace and type(out["ndarray"]) is np.ndarray
    assert out["enum"] == 1 and out["dataclass"] == {"lr": 0.1} and type(out["hfconfig"]) is transformers.GPT2Config
    with pytest.raises(SkeletonError, match="unknown skeleton tag"):  # the compatibility rule
        decode({"version": FORMAT_VERSION, "root": {"$": "from-a-later-version"}}, lambda name, device: None)
    with pytest.raises(SkeletonError, match="unsupported skeleton"):
        decode({"version": FORMAT_VERSION + 1, "root": None}, lambda name, device: None)


def test_the_tensor_field_table_lists_every_field_the_encoder_emits():
    documented = _first_cells(_section(5))
    assert len(documented) == len(set(documented)) == 11
    fields: set[str] = set()
    _walk(encode(_every_kind())[1]["root"], set(), fields)
    assert set(documented) == fields


def test_the_metadata_keys_and_dtypes_are_the_code_s(tmp_path):
    save_state({"a": torch.ones(1)}, tmp_path / "m.sft")
    raw = (tmp_path / "m.sft").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert _first_cells(_section(2)) == list(json.loads(raw[8 : 8 + n])["__metadata__"]) == ["format", SKELETON_KEY]
    assert f"`{JSON_KEYS_KEY}`" in _section(2)
    documented = set(re.findall(r"\| `([A-Z0-9_]+)` \| `[a-z0-9_]+` \| [1248] \|", _section(1)))
    assert documented == set(_DTYPE_NAMES)


def test_the_worked_example_is_what_save_state_writes(tmp_path, monkeypatch):
    section = _section(7)
    (program,) = _code_blocks(section, "python")
    header_block, skeleton_block, param_block = _code_blocks(section, "json")
    monkeypatch.chdir(tmp_path)
    exec(program, {})
    raw = (tmp_path / "example.sft").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert re.search(r"a file of (\d+) bytes", section).group(1) == str(len(raw))
    assert re.search(r"`N = (\d+)`", section).group(1) == str(n)
    assert re.search(r"(\d+) bytes of data", section).group(1) == str(len(raw) - 8 - n)
    assert re.search(r"including (\d+) bytes of\s+padding", section).group(1) == str(
        len(raw[8 : 8 + n]) - len(raw[8 : 8 + n].rstrip(b" "))
    )
    header = json.loads(raw[8 : 8 + n])
    metadata = header.pop("__metadata__")
    documented = json.loads(header_block)

    def layout(entries):  # dtype, shape and size of each entry, in data order by element size
        return {
            name: (e["dtype"], e["shape"], e["data_offsets"][1] - e["data_offsets"][0]) for name, e in entries.items()
        }

    assert layout(header) == layout(documented)
    assert [e["dtype"] for e in header.values()] == [e["dtype"] for e in documented.values()]  # I64 first
    ends = [e["data_offsets"] for e in documented.values()]
    assert (
        ends[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(ends)) and ends[-1][1] == len(raw) - 8 - n
    )
    assert list(metadata) == ["format", SKELETON_KEY] and metadata["format"] == "pt"
    assert json.dumps(json.loads(metadata[SKELETON_KEY])) == json.dumps(json.loads(skeleton_block))

    p = torch.nn.Parameter(torch.ones(2))
    p.no_decay = True
    assert json.dumps(encode({"p": p, "again": p})[1]["root"]["v"]) == json.dumps(json.loads(param_block))
    entries, skeleton = encode({"t": torch.randn(3, 2).t()})
    assert entries["t"].shape == (2, 3)
    assert f"node `{json.dumps(skeleton['root']['v']['t'])}`" in section
