"""2-rank gloo DDP: exact per-rank resume parity, disjoint covering shards, and Lightning keeping
our samplers (no DistributedSamplerWrapper) with both values of ``use_distributed_sampler``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers.ranks import check_ok, launch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_resume.py"
RESUME_STEPS = {"random": [2, 4], "batched": [3]}


def _launch(out: Path, use_distributed_sampler: bool, kinds: list[str]) -> None:
    # Both ranks are started here (LOCAL_RANK set), so Lightning does not re-launch the script and
    # each process can run several Trainers one after the other.
    check_ok(launch(SCRIPT, [str(out), str(int(use_distributed_sampler)), ",".join(kinds)], timeout=240))


def _read(out: Path, kind: str, phase: str, rank: int) -> dict:
    return json.loads((out / f"{kind}-{phase}-rank{rank}.json").read_text())


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("use_distributed_sampler", "specs"),
    [(True, ["random:ckpt", "batched:ckpt"]), (False, ["random:sft"])],
    ids=["uds-true-ckpt", "uds-false-sft"],
)
def test_ddp_resume_parity_per_rank(tmp_path, use_distributed_sampler, specs):
    _launch(tmp_path, use_distributed_sampler, specs)
    for kind in (spec.split(":")[0] for spec in specs):
        full = [_read(tmp_path, kind, "full", r) for r in range(2)]
        for record in full:
            assert record["world_size"] == 2
            assert record["loader_type"] == "ResumableDataLoader"
            # Lightning kept our sampler: no DistributedSamplerWrapper / fresh DistributedSampler
            assert record["sampler_type"] == {"random": "RandomSampler", "batched": "BatchedOrderedSampler"}[kind]
        seen = [record["seen"] for record in full]
        assert len(seen[0]) == len(seen[1])
        steps_per_epoch = len(seen[0]) // 2
        for epoch in range(2):
            shard = [
                [i for batch in seen[r][epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch] for i in batch]
                for r in range(2)
            ]
            assert not set(shard[0]) & set(shard[1]), "ranks' shards overlap"
            assert sorted(shard[0] + shard[1]) == list(range(22)), "shards do not cover the dataset"
        assert seen[0][:steps_per_epoch] != seen[0][steps_per_epoch:]  # a new shuffle per epoch
        for step in RESUME_STEPS[kind]:
            for rank in range(2):
                resumed = _read(tmp_path, kind, f"resume{step}", rank)["seen"]
                assert resumed == seen[rank][step:], f"{kind}: rank {rank} after resuming from step {step}"
        if kind == "random":
            _check_world_size_change(tmp_path, kind, seen, steps_per_epoch, spec_format(specs, kind))


def spec_format(specs: list[str], kind: str) -> str:
    return dict(spec.split(":") for spec in specs)[kind]


def _check_world_size_change(tmp_path: Path, kind: str, seen: list, steps_per_epoch: int, fmt: str) -> None:
    """Rank 0's 2-rank checkpoint resumed on 1 device: the rest of the epoch, nothing repeated or skipped."""
    sys.path.insert(0, str(SCRIPT.parent))
    import loader_harness as H

    step = 2
    path = H.ckpt_for_step(str(tmp_path / f"ckpt-{kind}"), step, fmt)
    _, rest = H.fit(lambda: H.make_loader(kind), str(tmp_path / "single"), ckpt_path=path, max_epochs=2, fmt=fmt)
    done = {i for r in range(2) for batch in seen[r][:step] for i in batch}
    epoch0 = [i for batch in rest[: len(rest) - 6] for i in batch]
    assert sorted(epoch0) == sorted(set(range(22)) - done)  # the epoch goes on, one rank now
    single_epoch1 = list(rest[len(rest) - 6 :])
    two_rank_epoch1 = {i for r in range(2) for batch in seen[r][steps_per_epoch:] for i in batch}
    assert sorted(i for b in single_epoch1 for i in b) == sorted(two_rank_epoch1) == list(range(22))
