"""One rank of a 2-rank gloo run of RankZeroGather (started twice by test_export_gather_ranks.py).

Usage: RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python export_gather_script.py
Each scenario asserts on both ranks and prints "<NAME> OK"; the last line is "ALL OK".
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import lightning_utils.io.gather as gather_module
from lightning_utils.io.gather import OtherRankError, RankZeroGather
from lightning_utils.io.weights import TensorSpec

RANK = int(os.environ["RANK"])


def export_dtype(dtype, target):
    return target if target is not None and dtype.is_floating_point else dtype


def choose_all(target=None, order=None):
    def choose(available):
        names = order or list(available)
        return [
            (n, TensorSpec(f"out.{n}", export_dtype(available[n].dtype, target), available[n].shape)) for n in names
        ], "x"

    return choose


def run(items, choose, sink):
    g = RankZeroGather(items)
    entries, extra = g.plan(choose)
    assert (extra == "x") == (RANK == 0), extra
    with g.outcome() as outcome:
        g.stream(entries, sink if RANK == 0 else None, outcome)
    return g, entries


def global_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "shard0_uneven": torch.randn(5, 3, generator=g),
        "shard1": torch.randn(4, 6, generator=g),
        "replicated": torch.randn(3, generator=g),
        "one_row": torch.randn(1, 4, generator=g),
        "mesh2d": torch.randn(4, 3, generator=g),
        "ints": torch.arange(10, dtype=torch.int64).reshape(5, 2),
        "empty": torch.empty(0, 3),
        "plain_everywhere": torch.randn(2, 2, generator=g),
        "only_rank1": torch.randn(3, 3, generator=g),
        "partial": torch.randn(2, 2, generator=g),
        "sharded_tensor": torch.randn(5, 4, generator=g),
    }


def scenario_mixed():
    mesh = init_device_mesh("cpu", (2,))
    mesh2 = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
    full = global_tensors()
    items = [
        ("shard0_uneven", distribute_tensor(full["shard0_uneven"], mesh, [Shard(0)])),
        ("shard1", distribute_tensor(full["shard1"], mesh, [Shard(1)])),
        ("replicated", distribute_tensor(full["replicated"], mesh, [Replicate()])),
        ("one_row", distribute_tensor(full["one_row"], mesh, [Shard(0)])),  # rank 1 holds nothing of it
        ("mesh2d", distribute_tensor(full["mesh2d"], mesh2, [Shard(0), Shard(1)])),
        ("ints", distribute_tensor(full["ints"], mesh, [Shard(0)])),
        ("empty", distribute_tensor(full["empty"], mesh, [Shard(0)])),
        ("plain_everywhere", full["plain_everywhere"]),
        # Partial: each rank holds half of the sum; only DTensor.full_tensor() can assemble it
        ("partial", DTensor.from_local(full["partial"] / 2, mesh, [Partial()])),
        ("sharded_tensor", sharded_tensor(full["sharded_tensor"])),
    ]
    if RANK == 1:
        items.append(("only_rank1", full["only_rank1"]))
    got = {}
    gather_module.PIECE_BYTES = 8  # the Shard(1) pieces travel in one-row slices

    def sink(entry, tensor):
        assert tensor.device.type == "cpu" and tensor.is_contiguous()
        got[entry.out.name] = tensor.clone()

    _, entries = run(items, choose_all(torch.bfloat16), sink)
    plan = {e.name: e for e in entries}
    assert plan["partial"].collective and plan["partial"].holders == (0, 1)
    assert [s.rank for s in plan["shard1"].sources] == [0, 1]  # pieces that are columns: sent in slices
    assert [s.rank for s in plan["replicated"].sources] == [0]  # a replica is sent once, by rank 0
    assert [s.rank for s in plan["only_rank1"].sources] == [1]
    assert [s.rank for s in plan["one_row"].sources] == [0]  # rank 1's empty shard is not sent
    assert [s.rank for s in plan["sharded_tensor"].sources] == [0, 1]
    assert not plan["empty"].sources and not plan["empty"].collective
    if RANK == 0:
        assert list(got) == [f"out.{n}" for n, _ in items] + ["out.only_rank1"], list(got)
        for name, value in full.items():
            want = value.to(torch.bfloat16) if value.is_floating_point() else value
            out = got[f"out.{name}"]
            assert out.dtype == want.dtype, (name, out.dtype)
            if name == "partial":
                torch.testing.assert_close(out, want, atol=1e-2, rtol=0)  # (x/2 + x/2) in float then bf16
            else:
                assert torch.equal(out, want), name
    gather_module.PIECE_BYTES = 16 << 20
    print("MIXED OK", flush=True)


def sharded_tensor(full):
    from torch.distributed._shard.sharded_tensor import Shard as STShard
    from torch.distributed._shard.sharded_tensor import init_from_local_shards
    from torch.distributed._shard.sharded_tensor.metadata import ShardMetadata

    rows = [(0, 3), (3, 2)][RANK]
    meta = ShardMetadata(shard_offsets=[rows[0], 0], shard_sizes=[rows[1], 4], placement=f"rank:{RANK}/cpu")
    local = full[rows[0] : rows[0] + rows[1]].clone()
    return init_from_local_shards([STShard(local, meta)], [5, 4])


def scenario_memory():
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(1)
    shapes = [(64, 64)] * 6 + [(128, 64), (64,)]
    items = [(f"w{i}", distribute_tensor(torch.randn(*s, generator=g), mesh, [Shard(0)])) for i, s in enumerate(shapes)]
    report = {}
    for name, target in (("fp32", None), ("bf16", torch.bfloat16)):
        seen = []
        g_, entries = run(items, choose_all(target), lambda e, t, seen=seen: seen.append(e.out.nbytes))
        tracker = g_.tracker
        largest = 128 * 64 * (4 if target is None else 2)
        assert tracker.largest_tensor_bytes == largest
        total = sum(e.out.nbytes for e in entries)
        report[name] = {"peak": tracker.peak_bytes, "largest": largest, "total": total}
        assert tracker.peak_bytes <= largest < total / 4, report
        if RANK == 0:
            assert tracker.peak_bytes > 0 and tracker.tensors == len(shapes)
        elif target is None:
            assert tracker.peak_bytes == 0, report  # sends its own shards as they are
        else:
            assert tracker.peak_bytes <= largest // 2, report  # a bf16 copy of one of its shards
        assert all(v == 0 for v in tracker.current.values()), tracker.current  # everything was freed
    print("MEMORY " + json.dumps(report), flush=True)
    print("MEMORY OK", flush=True)


def expect_failure(items, choose, sink, check):
    try:
        run(items, choose, sink)
    except Exception as exc:
        check(exc)
        return
    raise AssertionError("no error")


def scenario_failures():
    mesh = init_device_mesh("cpu", (2,))
    items = [(f"w{i}", distribute_tensor(torch.ones(4, 2) * i, mesh, [Shard(0)])) for i in range(4)]

    # rank 0's writer fails (a full disk) at the second tensor: both ranks stop there and raise it
    calls = []

    def full_disk(entry, tensor):
        calls.append(entry.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", "/export/model.safetensors")

    def disk_error(exc):
        assert isinstance(exc, OSError) and "No space left on device" in str(exc), exc
        assert isinstance(exc, OtherRankError) == (RANK == 1), type(exc)
        if RANK == 1:
            assert str(exc).startswith("rank 0: "), exc

    expect_failure(items, choose_all(), full_disk, disk_error)
    assert calls == (["w0", "w1"] if RANK == 0 else []), calls

    # rank 1 fails while preparing a piece: rank 0 learns it before the next tensor
    original = gather_module._local_piece

    def broken(value, index):
        raise ValueError("rank 1 cannot read its shard")

    if RANK == 1:
        gather_module._local_piece = broken

    def rank1_error(exc):
        assert isinstance(exc, ValueError) and "rank 1 cannot read its shard" in str(exc), exc
        assert isinstance(exc, OtherRankError) == (RANK == 0), type(exc)

    expect_failure(items, choose_all(), lambda e, t: None, rank1_error)
    gather_module._local_piece = original

    # the ranks disagree about a tensor: refused during the plan, on both
    mismatch = [("x", torch.zeros(2 + RANK))]
    expect_failure(mismatch, choose_all(), lambda e, t: None, lambda exc: _match(exc, "ranks must agree"))

    # rank 0's choice fails (bad metadata, a name clash): raised on both before any tensor moves
    def bad_choice(available):
        raise ValueError("metadata key 'module' is reserved")

    expect_failure(items, bad_choice, lambda e, t: None, lambda exc: _match(exc, "'module' is reserved"))

    # and the ranks are still in step: a normal gather works afterwards
    got = []
    run(items, choose_all(), lambda e, t: got.append(float(t.sum())))
    assert got == ([0.0, 8.0, 16.0, 24.0] if RANK == 0 else []), got
    print("FAILURES OK", flush=True)


def _match(exc, text):
    assert isinstance(exc, ValueError) and text in str(exc), exc


def main():
    dist.init_process_group("gloo")
    try:
        scenario_mixed()
        scenario_memory()
        scenario_failures()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    print("ALL OK", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
