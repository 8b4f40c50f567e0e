"""Sharded checkpoint directories at an ``s3://`` URL (:mod:`lightning_utils.io.sharded`), against moto's
S3 server on 127.0.0.1 over HTTP, with ranks as threads: each rank streams its own file into an
upload, the index lands last, a checkpoint rewritten under the same name stays readable until its
new index lands, interrupted saves leave the previous checkpoint and no index, reads are ranged
reads of exactly the bytes asked for, and removal takes the index first."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from helpers.s3 import s3_bucket_fixture, s3_server_fixture  # noqa: F401  (the s3_bucket and s3_server fixtures)
from sharded_ranks import on_ranks
from test_sharded import assert_whole, rank_state, whole

from lightning_utils.io import CheckpointFormatError, load_state, remote, storage
from lightning_utils.io.sharded import (
    INDEX_NAME,
    ShardedCheckpoint,
    TensorShard,
    consolidate,
    is_sharded_checkpoint,
    save_consolidated,
    save_sharded,
    writer,
)
from lightning_utils.io.sharded.layout import INDEX_VERSION, is_shard_file_name
from lightning_utils.io.state import load_structure
from lightning_utils.plugins import SafetensorsCheckpointIO

MiB = 1 << 20


@pytest.fixture
def small_parts(monkeypatch):
    """S3's smallest parts (5 MiB), so a few MiB per rank make a real multipart upload."""
    monkeypatch.setattr(remote, "PART_SIZE", 5 * MiB)
    monkeypatch.setattr(remote, "PARALLEL_PARTS", 2)


def save_on(world_size: int, url: str, state=rank_state) -> None:
    assert on_ranks(world_size, lambda c: save_sharded(state(c.rank, world_size), url, c)) == [None] * world_size


def files(url: str) -> list[str]:
    return [n for n in storage.listdir(url) if n != INDEX_NAME]


def big_state(rank: int, world_size: int, rows: int = 3 * MiB // 4) -> dict:
    """A 6 MiB float32 tensor per rank (multipart uploads with 5 MiB parts), plus the small test state."""
    g = torch.Generator().manual_seed(rank)
    state = rank_state(rank, world_size)
    state["big"] = TensorShard(torch.randn(rows, 2, generator=g), (rows * world_size, 2), (rows * rank, 0))
    return state


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_sharded_save_at_a_url_round_trips(s3_bucket, world_size):
    url = f"{s3_bucket}/run/step=1.sft"
    save_on(world_size, url)
    names = files(url)
    assert len(names) == world_size and all(is_shard_file_name(n) for n in names)
    assert len({n.split(".")[1] for n in names}) == 1  # one save id, shared by the ranks
    assert storage.listdir(f"{s3_bucket}/run") == ["step=1.sft"]  # nothing staged beside it
    index = json.loads(storage.read_bytes(f"{url}/{INDEX_NAME}"))
    assert index["version"] == INDEX_VERSION and [f["name"] for f in index["files"]] == names
    assert is_sharded_checkpoint(url)
    assert_whole(load_state(url))
    assert_whole(load_state(url, map_location="cpu"))
    structure = load_structure(url)
    assert structure["state_dict"]["w"].device.type == "meta" and structure["state_dict"]["w"].shape == (6, 4)


def test_each_rank_streams_its_file_into_a_multipart_upload_and_the_index_lands_last(s3_server, s3_bucket, small_parts):
    url = f"{s3_bucket}/run/last.sft"
    s3_server.requests.clear()
    save_on(2, url, big_state)
    writes = [(m, p) for m, p, _ in s3_server.requests if m in ("PUT", "POST") and "/last.sft/" in p]
    for rank in range(2):
        mine = [(m, p) for m, p in writes if f"shard-0000{rank}-of-00002." in p]
        assert any("uploads" in p and m == "POST" for m, p in mine)  # CreateMultipartUpload
        assert sum("partNumber=" in p for _, p in mine) == 2  # 6 MiB in two parts, streamed
    index_at = [i for i, (m, p) in enumerate(writes) if p.endswith(f"/{INDEX_NAME}")]
    assert index_at == [len(writes) - 1]  # one write of the index, after every part and completion
    out = load_state(url)
    for rank in range(2):
        rows = 3 * MiB // 4
        expected = torch.randn(rows, 2, generator=torch.Generator().manual_seed(rank))
        assert torch.equal(out["big"][rank * rows : (rank + 1) * rows], expected)


def test_a_rewritten_checkpoint_stays_readable_until_its_new_index_lands(s3_bucket, monkeypatch):
    url = f"{s3_bucket}/run/last.sft"
    save_on(2, url)
    old_files = files(url)
    seen = {}
    publish = writer._publish_in_place

    def publish_and_look(directory, names, index):
        # every rank's new file is uploaded, the index not yet: readers still get the old checkpoint
        seen["files"] = files(url)
        seen["state"] = load_state(url)
        publish(directory, names, index)

    monkeypatch.setattr(writer, "_publish_in_place", publish_and_look)

    def newer(rank, world_size):
        state = rank_state(rank, world_size)
        state["epoch"] = 2
        return state

    save_on(3, url, newer)
    assert set(old_files) < set(seen["files"]) and len(seen["files"]) == 5
    assert seen["state"]["epoch"] == 1
    assert_whole(seen["state"])
    new_files = files(url)
    assert len(new_files) == 3 and not set(new_files) & set(old_files)  # the old ones deleted after
    assert load_state(url)["epoch"] == 2


def test_the_server_stopped_mid_upload_leaves_the_previous_checkpoint_and_no_new_index(
    s3_server, s3_bucket, small_parts
):
    url = f"{s3_bucket}/run/last.sft"
    save_on(2, url)
    before = files(url)
    index_before = storage.read_bytes(f"{url}/{INDEX_NAME}")
    s3_server.stop_on = lambda method, target: "/last.sft/shard-00001" in target and "partNumber=2" in target
    errors = on_ranks(2, lambda c: save_sharded(big_state(c.rank, 2), url, c))
    assert all(e is not None and url in str(e) for e in errors)  # every rank raised, naming the save
    assert not s3_server.running
    s3_server.start()
    assert storage.read_bytes(f"{url}/{INDEX_NAME}") == index_before  # no index for the partial save
    assert set(before) <= set(files(url))
    assert_whole(load_state(url))
    # the next save of this checkpoint removes whatever the interrupted one left
    save_on(2, url)
    assert len(files(url)) == 2 and not set(files(url)) & set(before)
    assert_whole(load_state(url))


def test_a_rank_failing_mid_upload_aborts_it_and_leaves_nothing_of_the_save(
    s3_server, s3_bucket, small_parts, monkeypatch
):
    bucket = s3_bucket.removeprefix("s3://")
    url, fresh = f"{s3_bucket}/run/last.sft", f"{s3_bucket}/run/step=2.sft"
    save_on(2, url)
    before = {n: storage.read_bytes(f"{url}/{n}") for n in storage.listdir(url)}
    original = writer.write_entries

    def write_entries(f, specs, metadata):
        if any(s.name == "big" and s.shape[0] and s.source.flatten()[0] == BIG1[0, 0] for s in specs):
            f.write(b"\0" * (6 * MiB))  # a part uploaded, then the rank fails
            raise OSError("connection reset by peer")
        original(f, specs, metadata)

    BIG1 = big_state(1, 2)["big"].local
    monkeypatch.setattr(writer, "write_entries", write_entries)
    for target in (url, fresh):
        errors = on_ranks(2, lambda c, target=target: save_sharded(big_state(c.rank, 2), target, c))
        assert isinstance(errors[1], OSError)
        assert isinstance(errors[0], RuntimeError) and "rank 1: " in str(errors[0])
    assert s3_server.multipart_uploads(bucket) == []  # rank 1's upload was aborted
    assert {n: storage.read_bytes(f"{url}/{n}") for n in storage.listdir(url)} == before
    assert storage.listdir(fresh) == []  # rank 0's finished file was deleted: nothing left of the save
    assert not is_sharded_checkpoint(fresh)


def test_a_directory_without_its_index_is_not_a_checkpoint(s3_bucket):
    url = f"{s3_bucket}/run/last.sft"
    save_on(2, url)
    storage.remove(f"{url}/{INDEX_NAME}")
    assert not is_sharded_checkpoint(url)
    with pytest.raises(CheckpointFormatError, match=r"last\.sft: no index\.json: .*did not finish"):
        load_state(url)
    with pytest.raises(FileNotFoundError, match="nothing.sft"):
        load_state(f"{s3_bucket}/run/nothing.sft")


def test_last_checkpoint_lookup_names_a_sharded_last_by_its_index_and_skips_unfinished_ones(s3_bucket, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_utils._internals import last_checkpoint_urls

    run = f"{s3_bucket}/run"
    callback = ModelCheckpoint(dirpath=run)
    callback.FILE_EXTENSION = ".sft"
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), loggers=[], strategy=None)
    save_on(2, f"{run}/last.sft")
    save_on(2, f"{run}/last-v1.sft")
    storage.remove(f"{run}/last-v1.sft/{INDEX_NAME}")  # an unfinished save: not a last checkpoint
    assert last_checkpoint_urls(callback, trainer) == {f"{run}/last.sft/{INDEX_NAME}"}


def test_removal_deletes_the_index_first_then_the_whole_prefix(s3_server, s3_bucket):
    url = f"{s3_bucket}/run/step=4.sft"
    save_on(2, url)
    s3_server.requests.clear()
    SafetensorsCheckpointIO().remove_checkpoint(url)
    deletes = [(m, p) for m, p, _ in s3_server.requests if m == "DELETE" or (m == "POST" and "delete" in p)]
    assert deletes[0][1].endswith(f"/{INDEX_NAME}")
    assert storage.listdir(f"{s3_bucket}/run") == []


def test_reads_fetch_only_the_bytes_of_the_slices_asked_for(s3_bucket, monkeypatch):
    url = f"{s3_bucket}/x.sft"
    weight = torch.arange(64 * 4096, dtype=torch.float32).reshape(64, 4096)  # rows of 16 KiB

    def state(rank, world_size):
        return {"w": TensorShard(weight[32 * rank : 32 * rank + 32].clone(), (64, 4096), (32 * rank, 0))}

    save_on(2, url, state)
    fetched: list[int] = []
    read_into = remote.read_into

    def counted(u, pieces, *args, **kwargs):
        fetched.extend(len(b) for _, b in pieces)
        return read_into(u, pieces, *args, **kwargs)

    monkeypatch.setattr(remote, "read_into", counted)
    with ShardedCheckpoint(url) as checkpoint:
        out = checkpoint.read_block("w", (16, 0), (32, 4096))  # rows 16-47: half of each rank's block
        assert torch.equal(out, weight[16:48]) and sum(fetched) == out.numel() * 4  # one range per file
        fetched.clear()
        out = checkpoint.read_block("w", (0, 8), (64, 8))  # 32 bytes of each 16 KiB row: one range per row
        assert torch.equal(out, weight[:, 8:16]) and sum(fetched) == out.numel() * 4 and len(fetched) == 64
        fetched.clear()
        out = checkpoint.read_block("w", (0, 0), (64, 2048))  # half rows: fetched together, gaps included
        assert torch.equal(out, weight[:, :2048])
        assert out.numel() * 4 <= sum(fetched) <= 2 * out.numel() * 4 and len(fetched) == 2
        fetched.clear()
        out = torch.empty(4, 1)
        checkpoint.read_block("w", (30, 4095), (4, 1), out=out)  # across both files, into a given tensor
        assert torch.equal(out, weight[30:34, 4095:]) and sum(fetched) == 16
    for dtype in (torch.bfloat16, torch.bool):
        other = f"{s3_bucket}/{str(dtype)[6:]}.sft"
        values = (torch.arange(24).reshape(6, 4) % 3 == 0).to(dtype)
        save_on(2, other, lambda r, w, v=values: {"v": TensorShard(v[3 * r : 3 * r + 3].clone(), (6, 4), (3 * r, 0))})
        with ShardedCheckpoint(other) as checkpoint:
            assert torch.equal(checkpoint.read_block("v", (2, 1), (3, 2)), values[2:5, 1:3])


def test_a_truncated_or_foreign_shard_at_a_url_is_named(s3_bucket):
    url = f"{s3_bucket}/run/step=3.sft"
    save_on(2, url)
    name = files(url)[1]
    data = storage.read_bytes(f"{url}/{name}")
    with storage.atomic_writer(f"{url}/{name}") as f:
        f.write(data[:-7])
    with pytest.raises(CheckpointFormatError, match=rf"{name}: .*truncated"):
        load_state(url)
    storage.remove(f"{url}/{name}")
    with pytest.raises(CheckpointFormatError, match=rf"{name}: shard file is missing"):
        load_state(url)


def test_consolidated_saves_and_consolidate_work_across_urls(s3_bucket, tmp_path):
    single = f"{s3_bucket}/run/one.sft"
    assert on_ranks(2, lambda c: save_consolidated(rank_state(c.rank, 2), single, c)) == [None, None]
    assert storage.is_file(single)
    assert_whole(load_state(single))
    sharded = f"{s3_bucket}/run/dir.sft"
    save_on(2, sharded)
    consolidate(sharded, f"{s3_bucket}/out.sft")
    assert storage.read_bytes(f"{s3_bucket}/out.sft") == storage.read_bytes(single)  # what save_state writes
    consolidate(sharded, f"{s3_bucket}/out.ckpt")
    assert_whole(load_state(f"{s3_bucket}/out.ckpt", weights_only=False))
    consolidate(sharded, tmp_path / "local.sft")
    assert (tmp_path / "local.sft").read_bytes() == storage.read_bytes(single)
    assert os.listdir(tmp_path) == ["local.sft"]
    assert_whole(whole() | {"epoch": load_state(tmp_path / "local.sft")["epoch"]})


def test_a_failure_after_the_index_landed_keeps_the_new_checkpoint(s3_bucket, monkeypatch, caplog):
    url = f"{s3_bucket}/run/last.sft"
    save_on(2, url)
    list_dir = writer.storage.list_dir
    calls = []

    def listing_fails_after_publishing(path, *args, **kwargs):
        if storage.exists(f"{url}/{INDEX_NAME}") and calls:  # the second listing: after the new index
            raise PermissionError(f"{path}: listing denied")
        calls.append(path)
        return list_dir(path, *args, **kwargs)

    monkeypatch.setattr(writer.storage, "list_dir", listing_fails_after_publishing)

    def newer(rank, world_size):
        return rank_state(rank, world_size) | {"epoch": 2}

    save_on(2, url, newer)  # no error: the checkpoint is published, only the clean-up failed
    monkeypatch.undo()
    assert load_state(url)["epoch"] == 2
    assert_whole(load_state(url))
    assert "could not be listed" in caplog.text
    assert len(files(url)) == 4  # the replaced files stay (never read: no index names them)


def test_an_index_upload_that_errs_after_landing_counts_as_published(s3_bucket, monkeypatch):
    url = f"{s3_bucket}/run/last.sft"
    write_file = writer.storage.write_file

    def lands_then_errs(path, write, *args, **kwargs):
        size = write_file(path, write, *args, **kwargs)
        if str(path).endswith(INDEX_NAME):
            raise ConnectionResetError("the answer to the PUT was lost")
        return size

    monkeypatch.setattr(writer.storage, "write_file", lands_then_errs)
    save_on(2, url)
    monkeypatch.undo()
    assert len(files(url)) == 2
    assert_whole(load_state(url))


def test_a_save_id_already_used_under_the_prefix_is_drawn_again(s3_bucket, monkeypatch):
    url = f"{s3_bucket}/run/last.sft"
    tokens = iter(["00aa", "00aa", "00bb"])
    monkeypatch.setattr(writer.storage, "new_token", lambda: next(tokens))
    save_on(2, url)  # takes 00aa
    save_on(2, url)  # 00aa is taken: draws 00bb
    names = files(url)
    assert [n.split(".")[1] for n in names] == ["00bb", "00bb"]
    assert_whole(load_state(url))


def test_a_file_and_a_sharded_directory_of_one_name_replace_each_other(s3_bucket):
    from lightning_utils.io import save_state

    url = f"{s3_bucket}/run/last.sft"
    save_state({"epoch": 7}, url)  # a one-file checkpoint (e.g. a DDP run's)
    save_on(2, url)  # then a sharded one under the same name
    assert load_state(url)["epoch"] == 1 and storage.is_dir(url)
    assert storage.listdir(f"{s3_bucket}/run") == ["last.sft"]
    assert len(storage.listdir(url)) == 3  # the object named last.sft is gone: only the prefix
    save_state({"epoch": 8}, url)  # and back
    assert load_state(url)["epoch"] == 8 and storage.is_file(url)
    assert storage.listdir(url) == []  # nothing left under the prefix
    assert on_ranks(2, lambda c: save_consolidated(rank_state(c.rank, 2), url, c)) == [None, None]
    assert storage.is_file(url)
    assert_whole(load_state(url))


def test_a_one_element_block_reads_into_a_strided_tensor(s3_bucket):
    url = f"{s3_bucket}/x.sft"
    weight = torch.arange(8, dtype=torch.float32).reshape(8)

    def state(rank, world_size):
        return {"w": TensorShard(weight[4 * rank : 4 * rank + 4].clone(), (8,), (4 * rank,))}

    save_on(2, url, state)
    out = torch.zeros(4)[::2]  # contiguous by torch's rule (one element per row), stride 2
    with ShardedCheckpoint(url) as checkpoint:
        checkpoint.read_block("w", (5,), (1,), out=out[:1])
    assert out.tolist() == [5.0, 0.0]


def test_the_plugin_loads_a_sharded_checkpoint_named_by_its_index(s3_bucket):
    url = f"{s3_bucket}/run/last.sft"
    save_on(2, url)
    # what fit(ckpt_path="last") resolves to on object storage, under any strategy
    assert_whole(SafetensorsCheckpointIO().load_checkpoint(f"{url}/{INDEX_NAME}"))


def test_a_save_whose_clean_up_fails_after_landing_is_not_a_failed_save(s3_bucket, monkeypatch, caplog):
    from lightning_utils.io import save_state

    url = f"{s3_bucket}/run/last.sft"

    def listing_denied(*args, **kwargs):
        raise PermissionError("s3:ListBucket denied")

    monkeypatch.setattr(storage, "remove_shadowed", listing_denied)
    save_state({"epoch": 3}, url)  # the object landed: the save stands
    monkeypatch.undo()
    assert load_state(url)["epoch"] == 3
    assert "could not be removed" in caplog.text and "ListBucket" in caplog.text


def test_tensors_in_param_groups_loaded_lazily_from_a_url_are_read_before_use(s3_bucket):
    from lightning_utils.strategies.model_parallel import _materialized

    url = f"{s3_bucket}/run/opt.sft"
    groups = [{"lr": torch.tensor(0.01), "betas": (torch.tensor(0.9), 0.999), "params": ["w"]}]
    save_on(1, url, lambda rank, world_size: {"optimizer_states": [{"state": {}, "param_groups": groups}]})
    with ShardedCheckpoint(url) as source:
        lazy = source.load_lazy()["optimizer_states"][0]["param_groups"]
        assert source.handle_name(lazy[0]["lr"]) is not None  # not fetched yet: a handle
        (group,) = _materialized(lazy, source)
    assert group["lr"].item() == pytest.approx(0.01) and group["betas"][0].item() == pytest.approx(0.9)
    assert group["params"] == ["w"]
