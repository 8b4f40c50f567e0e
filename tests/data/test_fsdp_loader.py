"""ResumableDataLoader under ModelParallelStrategy (FSDP2, tensor parallelism) on 2 CPU gloo ranks:
it shards by the strategy's data-parallel rank and size (``trainer.distributed_sampler_kwargs``),
not by the global rank, although it was built before the strategy existed, and a mid-epoch
checkpoint resumes exactly on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.ranks import check_ok, launch

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_resume.py"

pytestmark = pytest.mark.ddp


def _read(out: Path, layout: str, phase: str, rank: int) -> dict:
    return json.loads((out / f"{layout}-{phase}-rank{rank}.json").read_text())


def test_fsdp2_and_tensor_parallel_shard_by_the_data_parallel_rank_and_resume_exactly(tmp_path):
    check_ok(launch(SCRIPT, [str(tmp_path), "dp2,tp2"], timeout=280))
    # dp=2 (FSDP2): two data-parallel ranks, disjoint shards covering the dataset each epoch
    full = [_read(tmp_path, "dp2", "full", r) for r in range(2)]
    assert [f["sampler_kwargs"] for f in full] == [{"num_replicas": 2, "rank": r} for r in range(2)]
    assert [f["shard"] for f in full] == [[2, 0], [2, 1]]
    steps = len(full[0]["seen"])
    assert steps == 2 * full[0]["len"] == 6  # 22 samples, 2 ranks, batches of 4: 3 steps an epoch
    for epoch in range(2):
        shards = [{i for b in f["seen"][3 * epoch : 3 * epoch + 3] for i in b} for f in full]
        assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(22))
    # dp=1 x tp=2: one data-parallel rank, so both tensor-parallel ranks train on the same samples
    # (with the global rank they would each see half, and the sharded matmuls would mix them)
    tp = [_read(tmp_path, "tp2", "full", r) for r in range(2)]
    assert [f["sampler_kwargs"] for f in tp] == [{"num_replicas": 1, "rank": 0}] * 2
    assert [f["shard"] for f in tp] == [[1, 0], [1, 0]]
    assert tp[0]["seen"] == tp[1]["seen"] and len(tp[0]["seen"]) == 2 * tp[0]["len"] == 12
    assert sorted(i for b in tp[0]["seen"][:6] for i in b) == list(range(22))
    assert tp[0]["losses"] == tp[1]["losses"]  # the tensor-parallel ranks compute one model
    # the mid-epoch checkpoint of step 3 resumes exactly, on every rank, in both layouts
    for layout, runs in (("dp2", full), ("tp2", tp)):
        for rank in range(2):
            resumed = _read(tmp_path, layout, "resume3", rank)
            assert resumed["seen"] == runs[rank]["seen"][3:], f"{layout}: rank {rank}"
            assert resumed["losses"] == pytest.approx(runs[rank]["losses"][3:], rel=1e-5), f"{layout}: rank {rank}"
