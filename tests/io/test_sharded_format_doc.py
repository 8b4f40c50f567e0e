"""``docs/sft-format.md`` section 8 describes the sharded layout the code writes: the file names, the
shard metadata keys, the index members and block fields, the version, and its example byte for byte."""

from __future__ import annotations

import json
import os
import re
import struct

import pytest
from sharded_ranks import on_ranks

from lightning_utils.io import load_state
from lightning_utils.io.sharded import INDEX_NAME, shard_file_name
from lightning_utils.io.sharded.layout import (
    INDEX_FORMAT,
    INDEX_VERSION,
    SHARDING_KEY,
    index_document,
    is_shard_file_name,
)

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "sft-format.md")
with open(DOC, encoding="utf-8") as f:
    TEXT = f.read()
SECTION = re.search(r"^## 8\. Sharded checkpoints$.*", TEXT, re.MULTILINE | re.DOTALL).group(0)


def _table(heading: str) -> list[str]:
    """The backquoted first cells of the table rows under ``### heading`` (every table, in order)."""
    part = re.search(rf"^### {heading}$(.*?)(?=^### |\Z)", SECTION, re.MULTILINE | re.DOTALL).group(1)
    return re.findall(r"^\| `([^`]+)` \|", part, re.MULTILINE)


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", SECTION, re.MULTILINE | re.DOTALL)


def test_the_documented_version_and_names_are_the_code_s():
    assert re.search(r"`INDEX_VERSION = (\d+)`", SECTION).group(1) == str(INDEX_VERSION)
    assert _table("Files") == ["shard-RRRRR-of-WWWWW.safetensors", "shard-RRRRR-of-WWWWW.ID.safetensors", INDEX_NAME]
    assert shard_file_name(3, 12) == "shard-00003-of-00012.safetensors"
    assert shard_file_name(3, 12, "0a9f") == "shard-00003-of-00012.0a9f.safetensors"
    assert is_shard_file_name("shard-00003-of-00012.0a9f.safetensors")
    with pytest.raises(ValueError, match="save_id"):
        shard_file_name(0, 1, "Not-Hex")
    assert _table("Shard files") == ["format", SHARDING_KEY]
    members = _table("The index")
    assert (
        members[:6]
        == list(index_document(1, [], [], {}))
        == ["format", "version", "world_size", "files", "tensors", "skeleton"]
    )
    assert members[6:] == ["file", "offsets", "shape"]  # the block fields
    assert f'`"{INDEX_FORMAT}"`' in SECTION


def test_the_example_is_what_save_sharded_writes(tmp_path, monkeypatch):
    (program,) = _code_blocks("python")
    (index_block,) = _code_blocks("json")
    namespace: dict = {}
    exec(program, namespace)
    monkeypatch.chdir(tmp_path)
    errors = on_ranks(
        2, lambda comm: namespace["save_sharded"](namespace["rank_state"](comm.rank), "example.sft", comm)
    )
    assert errors == [None, None]
    directory = tmp_path / "example.sft"
    assert sorted(os.listdir(directory)) == [INDEX_NAME, shard_file_name(0, 2), shard_file_name(1, 2)]
    assert json.loads((directory / INDEX_NAME).read_text()) == json.loads(index_block)
    for rank in range(2):
        size = (directory / shard_file_name(rank, 2)).stat().st_size
        assert f"`{shard_file_name(rank, 2)}` ({size} bytes" in " ".join(SECTION.split())
    data = (directory / shard_file_name(1, 2)).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    metadata = header.pop("__metadata__")
    documented = re.search(r"Rank 1's file has the metadata `(.*?)` and\s+one entry, `(.*?)`", SECTION, re.DOTALL)
    assert json.loads(" ".join(documented.group(1).split())) == metadata
    assert json.loads("{" + documented.group(2) + "}") == header
    state = load_state(directory)
    assert state["step"] == 7 and state["state_dict"]["weight"].equal(namespace["weight"])
