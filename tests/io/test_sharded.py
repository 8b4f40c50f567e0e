"""``lightning_utils.io.sharded`` without Lightning or processes: ranks are threads exchanging through
an in-memory ``Comm``, so the writer's protocol, the layout, resharding reads, consolidation and
every damaged-file error run in milliseconds."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import weakref
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from sharded_ranks import on_ranks

from lightning_utils.io import CheckpointFormatError, load_state, save_state
from lightning_utils.io.sharded import (
    INDEX_NAME,
    ShardedCheckpoint,
    TensorShard,
    consolidate,
    fill,
    is_sharded_checkpoint,
    load_sharded,
    save_consolidated,
    save_sharded,
    shard_file_name,
    storage,
)

torch.manual_seed(0)
W = torch.randn(6, 4)
B = torch.randn(6)
E = torch.randn(5, 3).to(torch.bfloat16)
STEP = torch.tensor(3.0)


def rank_state(rank: int, world_size: int) -> dict:
    """Rank ``rank``'s view of a checkpoint: W and E split by rows, B by columns... (uneven, one rank empty)."""
    rows = [(0, 6)] if world_size == 1 else [(0, 4), (4, 6)] if world_size == 2 else [(0, 3), (3, 6), (6, 6)]
    a, b = rows[rank]
    e_rows = [(0, 5)] if world_size == 1 else [(0, 3), (3, 5)] if world_size == 2 else [(0, 2), (2, 4), (4, 5)]
    c, d = e_rows[rank]
    sd = OrderedDict(w=TensorShard(W[a:b].clone(), (6, 4), (a, 0)), b=TensorShard(B[a:b].clone(), (6,), (a,)))
    sd._metadata = {"": {"version": 1}}
    return {
        "epoch": 1,
        "state_dict": sd,
        "optimizer_states": [
            {
                "state": {
                    "w": {
                        "step": STEP,
                        "exp_avg": TensorShard(W[a:b] * 2, (6, 4), (a, 0)),
                        "column": TensorShard(W[a:b, :1].clone(), (6, 1), (a, 0)),
                    }
                }
            }
        ],
        # replicated on every rank: stored once, by the owner
        "emb": TensorShard(E[c:d].clone(), (5, 3), (c, 0)),
        "rep": TensorShard(torch.arange(4.0), (4,), (0,), owner=rank == 0),
        "hyper_parameters": {"betas": (0.9, 0.99), "inf": math.inf},
    }


def whole() -> dict:
    sd = OrderedDict(w=W, b=B)
    sd._metadata = {"": {"version": 1}}
    return {
        "epoch": 1,
        "state_dict": sd,
        "optimizer_states": [{"state": {"w": {"step": STEP, "exp_avg": W * 2, "column": W[:, :1].clone()}}}],
        "emb": E,
        "rep": torch.arange(4.0),
        "hyper_parameters": {"betas": (0.9, 0.99), "inf": math.inf},
    }


def assert_whole(obj: dict) -> None:
    expected = whole()
    assert torch.equal(obj["state_dict"]["w"], expected["state_dict"]["w"])
    assert torch.equal(obj["state_dict"]["b"], expected["state_dict"]["b"])
    assert torch.equal(obj["optimizer_states"][0]["state"]["w"]["exp_avg"], W * 2)
    assert torch.equal(obj["optimizer_states"][0]["state"]["w"]["column"], W[:, :1])
    assert torch.equal(obj["optimizer_states"][0]["state"]["w"]["step"], STEP)
    assert torch.equal(obj["emb"], E) and obj["emb"].dtype == torch.bfloat16
    assert torch.equal(obj["rep"], torch.arange(4.0))
    assert obj["hyper_parameters"] == {"betas": (0.9, 0.99), "inf": math.inf}
    assert type(obj["state_dict"]) is OrderedDict and obj["state_dict"]._metadata == {"": {"version": 1}}


def save_on(world_size: int, path: Path, consolidated: bool = False) -> None:
    save = save_consolidated if consolidated else save_sharded
    assert on_ranks(world_size, lambda c: save(rank_state(c.rank, world_size), path, c)) == [None] * world_size


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_save_round_trips_the_whole_object(tmp_path, world_size):
    path = tmp_path / "step=1.sft"
    save_on(world_size, path)
    names = sorted(os.listdir(path))
    assert names == sorted([INDEX_NAME] + [shard_file_name(r, world_size) for r in range(world_size)])
    assert os.listdir(tmp_path) == ["step=1.sft"]  # the staging directory was renamed
    assert is_sharded_checkpoint(path)
    assert_whole(load_state(path))
    assert_whole(load_sharded(path, mmap=False))


def test_each_file_records_global_shapes_and_offsets_and_replicas_are_stored_once(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "c.sft"
    save_on(2, path)
    with safe_open(path / shard_file_name(1, 2), "pt") as f:  # any safetensors reader opens a shard
        sharding = json.loads(f.metadata()["lightning_utils.sharding"])
        assert sharding["rank"] == 1 and sharding["world_size"] == 2
        assert sharding["tensors"]["w"] == {"shape": [6, 4], "offsets": [4, 0]}
        assert torch.equal(f.get_tensor("w"), W[4:])
        stored = set(f.keys())
        assert "rep" not in stored and "optimizer_states.0.state.w.step" not in stored
    index = json.loads((path / INDEX_NAME).read_text())
    assert index["tensors"]["rep"]["chunks"] == [{"file": 0, "offsets": [0], "shape": [4]}]
    assert index["tensors"]["w"]["chunks"] == [
        {"file": 0, "offsets": [0, 0], "shape": [4, 4]},
        {"file": 1, "offsets": [4, 0], "shape": [2, 4]},
    ]


def test_any_slice_reads_from_the_blocks_it_overlaps_only(tmp_path):
    path = tmp_path / "c.sft"
    save_on(3, path)
    with ShardedCheckpoint(path) as checkpoint:
        assert torch.equal(checkpoint.read_block("w", (0, 0), (2, 4)), W[:2])
        assert sorted(checkpoint._files) == [0]  # rank 1's and 2's files were never opened
        assert torch.equal(checkpoint.read_block("w", (2, 1), (3, 2)), W[2:5, 1:3])  # across two files
        assert sorted(checkpoint._files) == [0, 1]
        lazy = checkpoint.load_lazy()
        handle = lazy["state_dict"]["w"]
        assert checkpoint.handle_name(handle) == "w" and handle.shape == (6, 4)
        target = torch.zeros(6, 4)
        fill(target, handle, checkpoint)
        assert torch.equal(target, W)
        assert checkpoint.handle_name(lazy["rep"]) is None  # one block: a memory-map view
        column = lazy["optimizer_states"][0]["state"]["w"]["column"]  # a size-1 dimension keeps a stride
        assert checkpoint.handle_name(column) == "optimizer_states.0.state.w.column"
        target = torch.zeros(6, 1)
        fill(target, column, checkpoint)
        assert torch.equal(target, W[:, :1])
        assert torch.equal(checkpoint.materialize(lazy)["state_dict"]["w"], W)
        with pytest.raises(ValueError, match="lies outside"):
            checkpoint.read_block("w", (5, 0), (2, 4))


def test_consolidated_save_is_the_single_file_save_state_writes(tmp_path):
    save_on(2, tmp_path / "full.sft", consolidated=True)
    assert os.listdir(tmp_path) == ["full.sft"]
    assert_whole(load_state(tmp_path / "full.sft"))
    save_state(whole(), tmp_path / "reference.sft")

    def header(name: str) -> tuple[dict, dict]:
        data = (tmp_path / name).read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        entries = json.loads(data[8 : 8 + n])
        metadata = entries.pop("__metadata__")
        return metadata, {k: (v["dtype"], v["shape"]) for k, v in entries.items()}

    # the same metadata (skeleton) and entries; only entries of equal element size may lie in another order
    assert header("full.sft") == header("reference.sft")


def test_consolidate_streams_a_directory_into_one_file(tmp_path):
    save_on(3, tmp_path / "d.sft")
    consolidate(tmp_path / "d.sft", tmp_path / "one.sft")
    consolidate(tmp_path / "d.sft", tmp_path / "one.ckpt")
    assert_whole(load_state(tmp_path / "one.sft"))
    assert_whole(torch.load(tmp_path / "one.ckpt", weights_only=False))
    assert sorted(os.listdir(tmp_path)) == ["d.sft", "one.ckpt", "one.sft"]


@pytest.mark.parametrize("suffix", [".sft", ".ckpt"])
def test_convert_of_a_directory_holds_one_tensor_in_memory_at_a_time(tmp_path, monkeypatch, suffix):
    """``lightning-utils convert DIR out.sft`` (or ``.ckpt``) reads each global tensor once, and a
    tensor it read is released before the next is read (at most one assembled at a time)."""
    from lightning_utils.cli import main

    save_on(3, tmp_path / "d.sft")
    original = ShardedCheckpoint.read
    reads: list[str] = []
    alive_at_each_read: list[list[str]] = []
    held: list[tuple[str, weakref.ref]] = []

    def read(self, name):
        alive_at_each_read.append([n for n, ref in held if ref() is not None])
        tensor = original(self, name)
        reads.append(name)
        held.append((name, weakref.ref(tensor)))
        return tensor

    monkeypatch.setattr(ShardedCheckpoint, "read", read)
    assert main(["convert", str(tmp_path / "d.sft"), str(tmp_path / f"one{suffix}")]) == 0
    with ShardedCheckpoint(tmp_path / "d.sft") as checkpoint:
        names = set(checkpoint.index.tensors)
    assert sorted(reads) == sorted(names) and len(names) == 7  # every tensor, each read once
    assert alive_at_each_read == [[]] * len(reads), alive_at_each_read
    converted = load_state(tmp_path / "one.sft") if suffix == ".sft" else torch.load(tmp_path / "one.ckpt")
    assert_whole(converted)


def test_inspect_of_a_directory_reads_only_the_index(tmp_path, monkeypatch, capsys):
    """``lightning-utils inspect DIR`` opens no shard file: it prints the tree with global shapes
    from the index alone, the same with the shard files deleted."""
    import builtins

    from lightning_utils.cli import main

    path = tmp_path / "d.sft"
    save_on(2, path)
    opened: list[str] = []
    original_open, original_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else repr(file))
        return original_open(file, *args, **kwargs)

    def spy_os_open(file, *args, **kwargs):
        opened.append(os.fspath(file))
        return original_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    shown = capsys.readouterr().out
    monkeypatch.undo()
    assert {p for p in opened if p.startswith(str(path))} == {str(path / INDEX_NAME)}
    assert "sharded safetensors, 2 files, global shapes; 7 tensors" in shown.splitlines()[0]
    assert "w: tensor float32 [6, 4]" in shown and "emb: tensor bfloat16 [5, 3]" in shown  # global shapes

    for r in range(2):
        (path / shard_file_name(r, 2)).unlink()
    assert main(["inspect", str(path)]) == 0
    assert capsys.readouterr().out == shown


def test_a_new_save_replaces_the_old_one_in_one_step(tmp_path):
    path = tmp_path / "last.sft"
    save_on(2, path)
    save_on(3, path)  # a directory replaced by a directory of another world size
    assert len(ShardedCheckpoint(path).index.files) == 3
    save_on(2, path, consolidated=True)  # a directory replaced by a file
    assert path.is_file()
    save_on(2, path)  # and back
    assert path.is_dir() and os.listdir(tmp_path) == ["last.sft"]
    assert_whole(load_state(path))


def test_a_value_the_skeleton_cannot_hold_fails_every_rank_before_anything_is_written(tmp_path):
    def save(comm):
        state = rank_state(comm.rank, 2)
        state["hyper_parameters"]["loss"] = object()
        save_sharded(state, tmp_path / "x.sft", comm)

    errors = on_ranks(2, save)
    assert isinstance(errors[0], TypeError) and "['hyper_parameters']['loss']" in str(errors[0])
    assert isinstance(errors[1], RuntimeError) and "rank 0 cannot save this checkpoint" in str(errors[1])
    assert os.listdir(tmp_path) == []


def test_a_failing_rank_aborts_the_save_on_every_rank_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.sft"
    save_on(2, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    original = storage.write_file

    def write_file(target, write):
        if shard_file_name(1, 2) in str(target):
            raise OSError(28, "No space left on device")
        return original(target, write)

    monkeypatch.setattr(storage, "write_file", write_file)
    errors = on_ranks(2, lambda c: save_sharded(rank_state(c.rank, 2), path, c))
    assert isinstance(errors[1], OSError)
    assert isinstance(errors[0], RuntimeError) and "rank 1: OSError" in str(errors[0])
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert os.listdir(tmp_path) == ["last.sft"]  # the staging directory was removed


def test_ranks_saving_different_structures_fail_together(tmp_path):
    def save(comm):
        state = rank_state(comm.rank, 2)
        if comm.rank == 1:
            del state["emb"]
        save_sharded(state, tmp_path / "x.sft", comm)

    errors = on_ranks(2, save)
    assert all(isinstance(e, RuntimeError) and "holds other sharded tensors than rank 0" in str(e) for e in errors)


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "step=3.sft"
    save_on(2, path)
    return path


def test_a_truncated_shard_is_named(saved):
    shard = saved / shard_file_name(1, 2)
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CheckpointFormatError, match=r"shard-00001-of-00002\.safetensors: .*truncated"):
        load_state(saved)


def test_a_corrupted_shard_header_is_named(saved):
    shard = saved / shard_file_name(0, 2)
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\x00\xff\x00\xff"  # same size, garbage header
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match=r"shard-00000-of-00002\.safetensors: not a valid safetensors file"):
        load_state(saved)


def test_a_shard_from_another_checkpoint_is_named(saved, tmp_path):
    other = tmp_path / "other.sft"
    on_ranks(2, lambda c: save_sharded({"x": TensorShard(torch.ones(3), (6,), (3 * c.rank,))}, other, c))
    shutil.copy(other / shard_file_name(1, 2), saved / shard_file_name(1, 2))
    index = json.loads((saved / INDEX_NAME).read_text())
    index["files"][1]["bytes"] = (saved / shard_file_name(1, 2)).stat().st_size
    (saved / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match=r"shard-00001-of-00002\.safetensors: .*another checkpoint"):
        load_state(saved)


def test_a_missing_shard_or_index_is_named(saved):
    (saved / shard_file_name(1, 2)).unlink()
    with pytest.raises(CheckpointFormatError, match=r"shard-00001-of-00002\.safetensors: shard file is missing"):
        load_state(saved)
    (saved / INDEX_NAME).unlink()
    with pytest.raises(CheckpointFormatError, match=r"step=3\.sft: no index\.json: .*did not finish"):
        load_state(saved)
    assert not is_sharded_checkpoint(saved)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(version=2), "unsupported version 2"),
        (lambda d: d["tensors"]["w"]["chunks"].pop(), "shards missing or overlapping"),
        (lambda d: d["tensors"]["w"]["chunks"][1].update(offsets=[5, 0]), "lies outside"),
        (lambda d: d["files"][0].update(name="../../etc/passwd"), "bad file record"),
        (lambda d: d["tensors"]["b"].update(dtype="F128"), "bad record for tensor 'b'"),
    ],
)
def test_a_damaged_index_is_named(saved, edit, message):
    index = json.loads((saved / INDEX_NAME).read_text())
    edit(index)
    (saved / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match=rf"index\.json: invalid index\.json: .*{message}"):
        load_state(saved)


def test_a_skeleton_view_of_a_sharded_tensor_is_refused(saved):
    index = json.loads((saved / INDEX_NAME).read_text())
    index["skeleton"]["root"]["v"]["state_dict"]["v"]["w"].update(off=0, sh=[2], st=[1])
    (saved / INDEX_NAME).write_text(json.dumps(index))
    with ShardedCheckpoint(saved) as checkpoint, pytest.raises(CheckpointFormatError, match="a view of the sharded"):
        checkpoint.load_lazy()


def test_the_index_is_written_last(saved, tmp_path, monkeypatch):
    """A save killed before its index leaves a staging directory that no reader takes for a checkpoint."""
    written: list[str] = []
    original = storage.write_file
    monkeypatch.setattr(storage, "write_file", lambda p, w: (written.append(Path(p).name), original(p, w))[1])
    save_on(2, tmp_path / "again.sft")
    assert written[-1] == INDEX_NAME and len(written) == 3


def test_publish_never_shows_a_partial_checkpoint(tmp_path):
    stage, final = tmp_path / ".lu-tmp-x", tmp_path / "a.sft"
    stage.mkdir()
    (stage / "f").write_bytes(b"new")
    final.mkdir()
    (final / "f").write_bytes(b"old")
    storage.publish(stage, final)
    assert (final / "f").read_bytes() == b"new" and not stage.exists()


def test_every_file_is_fsynced_before_the_directory_is_renamed_into_place(tmp_path, monkeypatch):
    """Durability of a local sharded save, in this order: each rank's file, then the index, then the
    staging directory are fsynced; the directory is renamed into place (a rename for a new name, an
    atomic exchange over an earlier checkpoint); then the parent directory is fsynced."""
    from lightning_utils.io.atomic import TEMP_PREFIX

    opened: dict[int, str] = {}
    events: list[tuple[str, ...]] = []
    real_open, real_fsync, real_rename, real_exchange = os.open, os.fsync, os.rename, storage._exchange

    def spy_open(file, flags, *args, **kwargs):
        fd = real_open(file, flags, *args, **kwargs)
        opened[fd] = os.fspath(file)
        return fd

    def spy_fsync(fd):
        events.append(("fsync", opened[fd]))
        real_fsync(fd)

    def spy_rename(src, dst, *args, **kwargs):
        events.append(("rename", os.fspath(src), os.fspath(dst)))
        real_rename(src, dst, *args, **kwargs)

    def spy_exchange(a, b):
        events.append(("exchange", os.fspath(a), os.fspath(b)))
        return real_exchange(a, b)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "rename", spy_rename)
    monkeypatch.setattr(storage, "_exchange", spy_exchange)
    path = tmp_path / "last.sft"
    for move in ("rename", "exchange"):  # a new name, then over the checkpoint the first save left
        events.clear()
        save_on(2, path)
        assert len(events) == 6, events
        files, index, staged, moved, parent = events[:2], events[2], events[3], events[4], events[5]
        stage = Path(staged[1])
        assert stage.parent == tmp_path and stage.name.startswith(TEMP_PREFIX)
        assert sorted(files) == sorted(("fsync", os.fspath(stage / shard_file_name(r, 2))) for r in (0, 1))
        assert index == ("fsync", os.fspath(stage / INDEX_NAME))  # written and flushed after every rank's file
        assert staged == ("fsync", os.fspath(stage))  # the directory's entries, before it is published
        assert moved == (move, os.fspath(stage), os.fspath(path))
        assert parent == ("fsync", os.fspath(tmp_path))  # the rename itself, last
        assert os.listdir(tmp_path) == ["last.sft"]
        assert_whole(load_state(path))


def test_header_of_a_shard_file_is_standard_safetensors(saved):
    data = (saved / shard_file_name(0, 2)).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert header["__metadata__"]["format"] == "pt"
    assert (8 + n) % 8 == 0
