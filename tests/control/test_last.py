"""``last`` follows the newest checkpoint: a symlink or a copy, replaced in one rename."""

from __future__ import annotations

import os

import pytest

from lightning_utils.control.last import copy_last, link_last


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_link_last_is_relative_and_replaces_a_file_a_link_or_a_folder(tmp_path):
    old, new = tmp_path / "step=3.sft", tmp_path / "step=5.sft"
    old.write_bytes(b"three")
    new.write_bytes(b"five")
    last = tmp_path / "last.sft"
    last.write_bytes(b"a full copy")  # what save_last=True wrote before
    link_last(new, last)
    assert os.readlink(last) == "step=5.sft" and last.read_bytes() == b"five"
    link_last(old, last)  # over a link
    assert os.readlink(last) == "step=3.sft"
    link_last(old, last)  # the same target again: nothing to do
    last.unlink()
    (tmp_path / "last.sft").mkdir()  # a sharded checkpoint folder saved as last
    (last / "shard").write_bytes(b"x")
    link_last(new, last)
    assert os.readlink(last) == "step=5.sft"
    assert files(tmp_path) == ["last.sft", "step=3.sft", "step=5.sft"]  # nothing staged left behind
    other = tmp_path / "elsewhere"
    other.mkdir()
    link_last(new, other / "last.sft")
    assert os.readlink(other / "last.sft") == os.path.join("..", "step=5.sft")


def test_copy_last_copies_and_never_writes_through_a_link(tmp_path):
    old, new = tmp_path / "step=3.sft", tmp_path / "step=5.sft"
    old.write_bytes(b"three")
    new.write_bytes(b"five" * 1000)
    last = tmp_path / "last.sft"
    link_last(old, last)
    copy_last(new, last)
    assert not last.is_symlink() and last.read_bytes() == new.read_bytes()
    assert old.read_bytes() == b"three"  # the file the link pointed to is untouched
    copy_last(old, last)
    assert last.read_bytes() == b"three"
    assert files(tmp_path) == ["last.sft", "step=3.sft", "step=5.sft"]
    with pytest.raises(ValueError, match="is not a file"):
        copy_last(tmp_path, last)
    assert last.read_bytes() == b"three"
