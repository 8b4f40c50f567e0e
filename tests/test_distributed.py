"""lightning_utils.distributed: ranks before/after process-group init, leader decorators, broadcast.

The 2-rank behaviour (ranks 0/1 before init from the launcher's environment, world size 2, a
broadcast and an all_gather_object in rank order after init) is asserted in
tests/callbacks/test_training_control_ddp.py on a real gloo run.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch.distributed as dist

from lightning_utils import distributed as D

ENV = (
    "RANK",
    "LOCAL_RANK",
    "SLURM_PROCID",
    "JSM_NAMESPACE_RANK",
    "WORLD_SIZE",
    "SLURM_NTASKS",
    "JSM_NAMESPACE_SIZE",
    "SLURM_LOCALID",
    "JSM_NAMESPACE_LOCAL_RANK",
)


@pytest.fixture
def clean_env(monkeypatch):
    for key in ENV:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_defaults_without_launcher(clean_env):
    assert (D.global_rank(), D.local_rank(), D.world_size()) == (0, 0, 1)
    assert D.is_global_leader() and D.is_local_leader() and not D.distributed_is_initialized()


def test_launcher_environment_before_init(clean_env):
    clean_env.setenv("LOCAL_RANK", "1")  # what Lightning's launcher gives its child processes
    assert D.global_rank() == 1 and D.local_rank() == 1 and not D.is_global_leader()
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    assert D.global_rank() == 5 and D.world_size() == 8 and D.local_rank() == 1
    clean_env.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x'"):
        D.global_rank()


def test_trainer_wins():
    trainer = SimpleNamespace(global_rank=3, local_rank=1, world_size=4)
    assert (D.global_rank(trainer), D.local_rank(trainer), D.world_size(trainer)) == (3, 1, 4)
    assert not D.is_global_leader(trainer) and not D.is_local_leader(trainer)


def test_leader_only_decorators_read_the_rank_at_call_time(clean_env):
    calls = []

    @D.global_leader_only
    def bare(x):
        calls.append(x)
        return x

    @D.local_leader_only(default="skipped")
    def with_default():
        return "ran"

    assert bare(1) == 1 and with_default() == "ran"
    clean_env.setenv("RANK", "1")
    clean_env.setenv("LOCAL_RANK", "1")
    assert bare(2) is None and with_default() == "skipped"
    assert calls == [1] and bare.__name__ == "bare"


def test_broadcast_object_single_process_and_through_strategy():
    obj = {"cmd": ["save"]}
    assert D.broadcast_object(obj) is obj
    seen = []
    trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda o, src=0: seen.append(src) or ["x"]))
    assert D.broadcast_object(obj, src=0, trainer=trainer) == ["x"] and seen == [0]


def test_after_init_uses_the_process_group(clean_env, tmp_path):
    clean_env.setenv("RANK", "7")  # the group, not the environment, is the truth after init
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert D.distributed_is_initialized()
        assert D.global_rank() == 0 and D.world_size() == 1
        assert D.broadcast_object(["quit"]) == ["quit"]
        assert D.all_gather_object(("rank", 0)) == [("rank", 0)]
    finally:
        dist.destroy_process_group()


def test_all_gather_object_in_a_single_process():
    obj = {"error": None}
    assert D.all_gather_object(obj) == [obj]


def test_multi_node_launcher_environment_before_init(clean_env):
    # Lightning's launcher gives its children LOCAL_RANK, NODE_RANK and WORLD_SIZE, but no RANK:
    # local rank 0 of node 1 is not the global leader.
    for key in ("NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        clean_env.delenv(key, raising=False)
    clean_env.setenv("LOCAL_RANK", "0")
    clean_env.setenv("NODE_RANK", "1")
    clean_env.setenv("WORLD_SIZE", "4")
    assert not D.is_global_leader() and D.is_local_leader()
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's: then the global rank is exact
    assert D.global_rank() == 3
    clean_env.setenv("RANK", "2")  # an explicit RANK always wins
    assert D.global_rank() == 2
    clean_env.delenv("RANK")
    clean_env.setenv("NODE_RANK", "0")
    clean_env.delenv("LOCAL_WORLD_SIZE")
    assert D.global_rank() == 1 and not D.is_global_leader()
