"""lightning_utils.data.samplers: the keyed permutation, each sampler's order and resume, sharding
across ranks, ``set_epoch``, state validation, and the resume contract the loader uses."""

from __future__ import annotations

import copy
import itertools
import json
import pickle
import time

import pytest
import torch
from torch.utils.data import DistributedSampler

from lightning_utils.data.samplers import (
    BatchedOrderedSampler,
    Bookmark,
    KeyedPermutation,
    OrderedSampler,
    PoolSampler,
    RandomSampler,
    ResumableSampler,
)


def take(sampler, k):
    it = iter(sampler)
    return [next(it) for _ in range(k)]


# -- KeyedPermutation ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 16, 17, 100, 255, 256, 257, 1000, 4097])
def test_keyed_permutation_is_a_bijection_and_both_paths_agree(n):
    perm = KeyedPermutation(n, seed=11, epoch=3)
    scalar = [perm[i] for i in range(n)]
    assert sorted(scalar) == list(range(n))
    assert perm.take(torch.arange(n)).tolist() == scalar


def test_keyed_permutation_depends_on_seed_and_epoch_only():
    a = [KeyedPermutation(50, 1, 0)[i] for i in range(50)]
    assert a == [KeyedPermutation(50, 1, 0)[i] for i in range(50)]
    assert a != [KeyedPermutation(50, 2, 0)[i] for i in range(50)]
    assert a != [KeyedPermutation(50, 1, 1)[i] for i in range(50)]
    assert a != list(range(50))


AWKWARD = [1, 2, 3, 31, 127, 4093, 2**12 + 1, 2**13 - 1, 2**13, 2**13 + 1]  # primes, powers of 2 and neighbours


@pytest.mark.parametrize("n", AWKWARD)
def test_permutation_is_a_bijection_for_awkward_sizes(n):
    for seed, epoch in ((0, 0), (12345, 7)):
        perm = KeyedPermutation(n, seed=seed, epoch=epoch)
        values = perm.take(torch.arange(n))
        assert torch.equal(torch.sort(values).values, torch.arange(n))
        probe = list(range(0, n, max(1, n // 50)))
        assert [perm[i] for i in probe] == values[probe].tolist()  # scalar path agrees
    assert RandomSampler(n, seed=1).state_dict()["length"] == n
    assert sorted(RandomSampler(n, seed=1)) == list(range(n))


def test_keyed_permutation_large_and_bad_input():
    perm = KeyedPermutation(10**8, seed=0)
    positions = torch.tensor([0, 1, 5, 10**8 - 1])
    values = perm.take(positions).tolist()
    assert values == [perm[int(p)] for p in positions]
    assert all(0 <= v < 10**8 for v in values)
    assert perm[-1] == perm[10**8 - 1]
    with pytest.raises(IndexError):
        perm[10**8]
    with pytest.raises(ValueError, match="n must be"):
        KeyedPermutation(-1, 0)


# -- PoolSampler -----------------------------------------------------------------------------------


def test_pool_draws_are_permutations_and_index_resets():
    s = PoolSampler(range(5))
    it = iter(s)
    first = []
    for expected_index in (1, 2, 3, 4, 0):
        first.append(next(it))
        assert s.index() == expected_index
    assert sorted(first) == [0, 1, 2, 3, 4]
    second = [next(it) for _ in range(5)]
    assert sorted(second) == [0, 1, 2, 3, 4]
    assert s.index() == 0
    assert s.epoch == 2
    # endless; len is the pool size
    assert len(list(itertools.islice(iter(s), 12))) == 12
    assert len(s) == 5


def test_pool_sample_api_and_resume_exact_without_aliasing():
    s = PoolSampler(list("abcdef"), seed=4)
    drawn = [s.sample() for _ in range(2)]
    state = s.state_dict()
    frozen = copy.deepcopy(state)
    rest_first = [s() for _ in range(4)]
    assert state == frozen  # no aliasing: the saved state does not move on
    t = PoolSampler(list("abcdef"), seed=4)
    t.load_state_dict(state)
    rest = [t.sample() for _ in range(4)]
    assert sorted(drawn + rest) == list(range(6))
    assert rest == rest_first  # exact order, not just the same set
    # iteration and sample() share one position
    u = PoolSampler(list("abcdef"), seed=4)
    u.load_state_dict(state)
    assert take(u, 4) == rest_first


def test_pool_values_indices_and_empty():
    values = list(itertools.islice(iter(PoolSampler(["a", "b", "c"], keep_all=True)), 3))
    assert sorted(values) == ["a", "b", "c"]
    indices = list(itertools.islice(iter(PoolSampler(["a", "b", "c"])), 3))
    assert sorted(indices) == [0, 1, 2]
    assert all(type(i) is int for i in indices)
    assert PoolSampler(["a", "b", "c"]).sample(["x", "y", "z"]) in {"x", "y", "z"}
    empty = PoolSampler([])
    with pytest.raises(IndexError):
        empty.sample()
    assert list(empty) == []
    assert len(empty) == 0


def test_pool_seed_none_uses_lightning_global_seed(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "123")
    assert PoolSampler(range(4)).seed == 123
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert PoolSampler(range(4)).seed == 0


def test_pool_set_epoch_never_resets_the_bag():
    s = PoolSampler(range(6), seed=1)
    first = take(s, 3)
    state = s.state_dict()
    t = PoolSampler(range(6), seed=1)
    t.load_state_dict(state)
    t.set_epoch(5)
    assert sorted(first + take(t, 3)) == list(range(6))


# -- OrderedSampler --------------------------------------------------------------------------------


def test_ordered_epochs_and_empty():
    s = OrderedSampler(5)
    assert list(s) == [0, 1, 2, 3, 4]
    assert list(s) == [0, 1, 2, 3, 4]
    assert list(OrderedSampler(0)) == []
    assert len(OrderedSampler(7)) == 7


def test_ordered_resume_after_exactly_three():
    s = OrderedSampler(5)
    it = iter(s)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    state = s.state_dict()
    assert state["position"] == 3  # indices yielded, so index 2 is not yielded again
    t = OrderedSampler(5)
    t.load_state_dict(state)
    assert list(t) == [3, 4]
    assert list(t) == [0, 1, 2, 3, 4]


def test_ordered_position_past_the_end_restarts():
    s = OrderedSampler(3)
    s.load_state_dict({"position": 7, "length": 3})  # a minimal state: position and length only
    assert list(s) == [0, 1, 2]


# -- RandomSampler ---------------------------------------------------------------------------------


def test_random_epoch_resume_and_next_epoch():
    s = RandomSampler(10, seed=3)
    epoch0 = take(s, 4)
    state = s.state_dict()
    reference = RandomSampler(10, seed=3)
    full0, full1 = list(reference), list(reference)
    assert sorted(full0) == list(range(10)) and sorted(full1) == list(range(10))
    assert full0 != full1
    assert epoch0 == full0[:4]
    t = RandomSampler(10, seed=3)
    t.load_state_dict(state)
    assert list(t) == full0[4:]
    assert list(t) == full1
    # the state holds what drives the shuffle: seed and epoch (the keyed generator), not a list
    assert {"seed", "epoch", "position", "length"} <= set(state)
    assert all(isinstance(v, (int, bool, str, type(None))) for v in state.values())


def test_random_seeding_and_plain_ints():
    a, b, c = RandomSampler(50, seed=5), RandomSampler(50, seed=5), RandomSampler(50, seed=6)
    la, lb, lc = list(a), list(b), list(c)
    assert la == lb and la != lc
    assert all(type(i) is int for i in la)
    assert RandomSampler(torch.zeros(7)).length == 7  # a sized dataset works as length


def test_random_sampler_1e8_is_o1():
    s = RandomSampler(10**8, seed=1)
    it = iter(s)
    head = [next(it) for _ in range(100)]
    state = s.state_dict()
    assert len(json.dumps(state)) < 10_000
    assert len(pickle.dumps(state)) < 10_000
    start = time.perf_counter()
    t = RandomSampler(10**8, seed=1)
    t.load_state_dict(state)
    nxt = next(iter(t))
    elapsed = time.perf_counter() - start
    assert nxt == next(it)
    assert len(set(head)) == 100
    # generous bound: a randperm(10**8) alone takes seconds and 800 MB; benchmarks/samplers.py measures
    assert elapsed < 1.0


# -- BatchedOrderedSampler -------------------------------------------------------------------------

BUCKETS = {1: [("p", 1.0)] * 4, 2: [("p", 2.0)] * 2}


def test_batched_duration_cap_is_enforced():
    # [[0,1,2],[3,4]] would break the cap: the padded cost of [3,4] is 2.0 x 2 = 4 > max_duration=3.
    s = BatchedOrderedSampler(BUCKETS, max_duration=3, max_batch_size=10)
    assert s.batches == [[0, 1, 2], [3], [4]]
    assert BatchedOrderedSampler(BUCKETS, max_duration=3, max_batch_size=10, drop_last=False).batches == [
        [0, 1, 2],
        [3],
        [4],
        [5],
    ]
    # cost="sum" (packed batches) caps the total duration instead
    assert BatchedOrderedSampler(BUCKETS, max_duration=3, max_batch_size=10, cost="sum").batches == [[0, 1, 2], [3, 4]]
    assert BatchedOrderedSampler(BUCKETS, max_duration=3, max_batch_size=10, cost="sum", drop_last=False).batches == [
        [0, 1, 2],
        [3, 4],
        [5],
    ]
    buckets2 = {1: [("p", 1.0), ("p", 1.5)], 2: [("p", 2.0)], 3: [("p", 3.0)]}
    assert BatchedOrderedSampler(buckets2, max_duration=4, max_batch_size=10, drop_last=False).batches == [
        [0, 1],
        [2],
        [3],
    ]


def test_batched_cost_never_exceeds_cap_unless_single_item():
    durations = [0.5, 3.0, 1.0, 2.5, 0.1, 4.0, 7.0, 1.5, 1.5, 0.2, 6.0, 2.0]
    buckets = [[(None, d) for d in durations[:6]], [(None, d) for d in durations[6:]]]
    s = BatchedOrderedSampler(buckets, max_duration=6.5, max_batch_size=3, drop_last=False)
    assert [i for b in s.batches for i in b] == list(range(len(durations)))
    for batch in s.batches:
        assert len(batch) <= 3
        cost = max(durations[i] for i in batch) * len(batch)
        assert cost <= 6.5 or len(batch) == 1


def test_batched_size_cap():
    for max_duration in (100, -1, None):
        s = BatchedOrderedSampler(BUCKETS, max_duration=max_duration, max_batch_size=2, drop_last=False)
        assert s.batches == [[0, 1], [2, 3], [4, 5]]
        assert list(s) == [[0, 1], [2, 3], [4, 5]]
        assert len(s) == 3


def test_batched_invalid_limits():
    with pytest.raises(ValueError, match="max_duration=0"):
        BatchedOrderedSampler(BUCKETS, max_duration=0, max_batch_size=2)
    with pytest.raises(ValueError, match="max_batch_size=0"):
        BatchedOrderedSampler(BUCKETS, max_duration=3, max_batch_size=0)
    with pytest.raises(ValueError, match="set max_duration or max_batch_size"):
        BatchedOrderedSampler(BUCKETS)
    with pytest.raises(ValueError, match="bucket 2, entry 0"):
        BatchedOrderedSampler({1: [("p", 1.0)], 2: [("p", "long")]}, max_batch_size=2)
    with pytest.raises(ValueError, match="cost"):
        BatchedOrderedSampler(BUCKETS, max_batch_size=2, cost="max")


def test_batched_shuffled_resume_and_reproducible_reshuffle():
    buckets = {k: [("p", float(k))] * 3 for k in range(1, 6)}

    def make():
        return BatchedOrderedSampler(buckets, max_duration=8, max_batch_size=2, shuffle=True, drop_last=False, seed=9)

    reference = make()
    epoch0, epoch1 = list(reference), list(reference)
    assert sorted(map(tuple, epoch0)) == sorted(map(tuple, reference.batches))
    assert epoch0 != epoch1  # a new shuffle each epoch
    s = make()
    head = take(s, 3)
    state = s.state_dict()
    assert "batches" not in state  # O(1): a fingerprint, not the batch list
    t = make()
    t.load_state_dict(state)
    assert head + list(t) == epoch0
    assert list(t) == epoch1
    # a state holding the batch list instead of the layout's fingerprint is refused with a clear message
    with pytest.raises(ValueError, match="missing keys"):
        make().load_state_dict({"position": 1, "batches": reference.batches})
    # a layout built from other buckets or limits is refused
    other = BatchedOrderedSampler(buckets, max_duration=9, max_batch_size=3, shuffle=True, drop_last=False, seed=9)
    with pytest.raises(ValueError, match="num_batches|fingerprint|num_items"):
        other.load_state_dict(state)


# -- sharding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [
        lambda **kw: OrderedSampler(20, **kw),
        lambda **kw: RandomSampler(20, seed=2, **kw),
        lambda **kw: BatchedOrderedSampler([[(None, 1.0)] * 20], max_batch_size=2, shuffle=True, **kw),
    ],
    ids=["ordered", "random", "batched"],
)
def test_two_replicas_are_disjoint_and_cover(factory):
    shards = [list(factory(num_replicas=2, rank=r)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(factory(num_replicas=2, rank=0))
    flat = [tuple(x) if isinstance(x, list) else x for shard in shards for x in shard]
    assert len(set(flat)) == len(flat)
    whole = [tuple(x) if isinstance(x, list) else x for x in factory()]
    assert sorted(flat) == sorted(whole)


def test_pool_replicas_split_each_bag():
    shards = [list(itertools.islice(iter(PoolSampler(range(10), seed=1, num_replicas=2, rank=r)), 5)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    assert len(PoolSampler(range(10), num_replicas=2, rank=0)) == 5


def test_uneven_shards_pad_or_drop():
    padded = [list(RandomSampler(7, seed=1, num_replicas=2, rank=r)) for r in range(2)]
    assert len(padded[0]) == len(padded[1]) == 4
    assert set(padded[0] + padded[1]) == set(range(7))
    dropped = [list(RandomSampler(7, seed=1, num_replicas=2, rank=r, drop_last=True)) for r in range(2)]
    assert len(dropped[0]) == len(dropped[1]) == 3
    assert len(set(dropped[0] + dropped[1])) == 6
    ordered = [list(OrderedSampler(5, num_replicas=2, rank=r)) for r in range(2)]
    assert ordered == [[0, 2, 4], [1, 3, 0]]  # DistributedSampler(shuffle=False) semantics


def test_replicas_are_read_from_torch_distributed_when_iteration_starts(monkeypatch):
    import lightning_utils.data.samplers.rank as rank_mod

    s = RandomSampler(10, seed=4)  # built before the "process group" exists
    monkeypatch.setattr(rank_mod.dist, "is_available", lambda: True)
    monkeypatch.setattr(rank_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(rank_mod.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(rank_mod.dist, "get_rank", lambda: 1)
    assert len(s) == 5
    assert list(s) == list(RandomSampler(10, seed=4, num_replicas=2, rank=1))


def test_set_replicas_gives_the_data_parallel_shard_and_explicit_arguments_win(monkeypatch):
    """Tensor parallelism: 4 processes, 2 data-parallel ranks; global rank 3 is data-parallel rank 1."""
    import lightning_utils.data.samplers.rank as rank_mod

    monkeypatch.setattr(rank_mod.dist, "is_available", lambda: True)
    monkeypatch.setattr(rank_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(rank_mod.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(rank_mod.dist, "get_rank", lambda: 3)
    s = RandomSampler(10, seed=4)
    assert (s.num_replicas, s.rank, len(s)) == (4, 3, 3)  # the process group's view
    s.set_replicas(2, 1)
    assert (s.num_replicas, s.rank, len(s)) == (2, 1, 5)
    assert list(s) == list(RandomSampler(10, seed=4, num_replicas=2, rank=1))
    assert s.state_dict()["num_replicas"] == 2
    s.set_replicas(None, None)
    assert (s.num_replicas, s.rank) == (4, 3)
    explicit = OrderedSampler(10, num_replicas=5, rank=0)
    explicit.set_replicas(2, 1)
    assert (explicit.num_replicas, explicit.rank) == (5, 0)  # the constructor's arguments win
    with pytest.raises(ValueError, match="rank must be < num_replicas"):
        s.set_replicas(2, 2)
    with pytest.raises(ValueError, match="needs both"):
        s.set_replicas(2, None)


def test_bad_replica_arguments():
    with pytest.raises(ValueError, match="num_replicas"):
        OrderedSampler(4, num_replicas=0)
    with pytest.raises(ValueError, match="rank must be < num_replicas"):
        OrderedSampler(4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="outside"):
        list(OrderedSampler(4, rank=3))  # world size 1 resolved at iteration


def test_state_is_rank_independent_and_survives_a_world_size_change():
    two = [RandomSampler(30, seed=8, num_replicas=2, rank=r) for r in range(2)]
    consumed = [take(s, 4) for s in two]
    assert two[0].state_dict() == two[1].state_dict()  # rank 0's checkpoint restores every rank
    state = two[0].state_dict()
    assert state["position"] == 8
    seen = consumed[0] + consumed[1]
    rest = _remaining(RandomSampler(30, seed=8, num_replicas=1, rank=0), state)
    assert sorted(rest + seen) == list(range(30))  # nothing repeated, nothing skipped
    # 3 ranks: the 22 remaining items, padded to 24 with the epoch's first items (DistributedSampler style)
    shards = [_remaining(RandomSampler(30, seed=8, num_replicas=3, rank=r), state) for r in range(3)]
    assert [len(x) for x in shards] == [8, 8, 8]
    flat = [x for shard in shards for x in shard]
    assert set(flat) >= set(range(30)) - set(seen)
    assert len(flat) - len(set(flat) - set(seen)) == 2  # only the two padding items repeat


def _remaining(sampler, state):
    sampler.load_state_dict(state)
    return list(sampler)


# -- set_epoch and state validation ----------------------------------------------------------------


def test_set_epoch_keeps_a_restored_position_of_the_same_epoch():
    reference = RandomSampler(12, seed=1)
    epochs = [list(reference) for _ in range(3)]
    s = RandomSampler(12, seed=1)
    s.set_epoch(1)
    head = take(s, 5)
    assert head == epochs[1][:5]
    t = RandomSampler(12, seed=1)
    t.load_state_dict(s.state_dict())
    t.set_epoch(1)  # what Lightning does after restoring a mid-epoch checkpoint
    assert list(t) == epochs[1][5:]
    t.set_epoch(2)
    assert list(t) == epochs[2]
    u = RandomSampler(12, seed=1)
    u.load_state_dict(s.state_dict())
    u.set_epoch(0)  # a different epoch starts that epoch from its beginning
    assert list(u) == epochs[0]


def test_set_epoch_of_the_same_lightning_epoch_keeps_a_rolled_over_position():
    """A loader cycled within one Lightning epoch rolls its sampler over into the next epoch on
    its own; set_epoch(the same value as before) after restoring that state must keep it."""
    s = RandomSampler(6, seed=3)
    s.set_epoch(0)
    first = list(s)
    it = iter(s)  # a second pass in the same Lightning epoch: rolls over to epoch 1
    head = [next(it), next(it)]
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["set_epoch"] == 0
    t = RandomSampler(6, seed=3)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    t.set_epoch(0)  # what Lightning does when resuming epoch 0
    rest = list(t)
    assert head + rest == RandomSampler(6, seed=3).permutation(1).take(torch.arange(6)).tolist()
    assert sorted(first) == sorted(head + rest) == list(range(6))
    t.set_epoch(1)  # a new value still starts that epoch from its beginning
    assert list(t) == RandomSampler(6, seed=3).permutation(1).take(torch.arange(6)).tolist()


def test_set_epoch_does_not_disturb_a_running_iterator():
    s = OrderedSampler(6)
    it = iter(s)
    assert [next(it), next(it)] == [0, 1]
    s.set_epoch(3)
    assert list(it) == [2, 3, 4, 5]
    assert s.epoch == 3


@pytest.mark.parametrize(
    "make",
    [
        lambda: OrderedSampler(5),
        lambda: RandomSampler(5, seed=1),
        lambda: PoolSampler(range(5), seed=1),
        lambda: BatchedOrderedSampler(BUCKETS, max_batch_size=2, shuffle=True, seed=1),
    ],
    ids=["ordered", "random", "pool", "batched"],
)
def test_bad_states_raise_value_errors_naming_the_problem(make):
    s = make()
    good = s.state_dict()
    with pytest.raises(ValueError, match="expects a dict"):
        s.load_state_dict([1, 2])
    with pytest.raises(ValueError, match="missing keys"):
        s.load_state_dict({k: v for k, v in good.items() if k != "position"})
    with pytest.raises(ValueError, match="not a"):
        s.load_state_dict({**good, "sampler": "SomethingElse"})
    with pytest.raises(ValueError, match="position must be >= 0"):
        s.load_state_dict({**good, "position": -1})
    key = "num_batches" if "num_batches" in good else "length"
    with pytest.raises(ValueError, match=f"{key}="):
        s.load_state_dict({**good, key: good[key] + 1})
    s.set_state(s.get_state())  # aliases


def test_state_without_set_epoch_key_still_loads():
    s = OrderedSampler(5)
    state = s.state_dict()
    del state["set_epoch"]
    state["position"] = 2
    t = OrderedSampler(5)
    t.load_state_dict(state)
    t.set_epoch(0)
    assert list(t) == [2, 3, 4]
    with pytest.raises(ValueError, match="set_epoch must be an int"):
        t.load_state_dict({**state, "set_epoch": "x"})


def test_a_loader_state_given_to_a_sampler_says_so():
    from lightning_utils.data.loader import ResumableDataLoader

    loader = ResumableDataLoader(list(range(5)), batch_size=2, sampler=OrderedSampler(5))
    with pytest.raises(ValueError, match="ResumableDataLoader state .*'sampler' entry"):
        OrderedSampler(5).load_state_dict(loader.state_dict())
    OrderedSampler(5).load_state_dict(loader.state_dict()["sampler"])


def test_seed_mismatch_is_refused():
    state = RandomSampler(9, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1 but this sampler was built with seed=2"):
        RandomSampler(9, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="not a OrderedSampler"):
        OrderedSampler(9).load_state_dict(state)


def test_samplers_are_distributed_samplers_for_lightning():
    for s in (
        OrderedSampler(3),
        RandomSampler(3),
        PoolSampler(range(3)),
        BatchedOrderedSampler(BUCKETS, max_batch_size=2),
    ):
        assert isinstance(s, DistributedSampler) and isinstance(s, ResumableSampler)
        assert s.num_replicas == 1 and s.rank == 0
        repr(s)


# -- the resume contract (what ResumableDataLoader uses) --------------------------------------------


def test_plan_pass_is_pure_and_describes_the_next_pass():
    s = RandomSampler(10, seed=2, num_replicas=2, rank=1)
    take(s, 3)  # epoch 0, global position 6
    before = s.state_dict()
    plan = s.plan_pass()
    assert (plan.epoch, plan.start, plan.num_replicas, plan.rank) == (0, 6, 2, 1)
    assert (plan.length, plan.epoch_size, plan.epoch_arg) == (2, 10, None)
    assert s.state_dict() == before  # planning changed nothing
    s.set_epoch(3)
    plan = s.plan_pass()
    assert (plan.epoch, plan.start, plan.epoch_arg) == (3, 0, 3)
    used_up = OrderedSampler(4)
    list(used_up)
    plan = used_up.plan_pass()
    assert (plan.epoch, plan.start) == (1, 0)  # the epoch is used up: the next pass rolls over
    assert PoolSampler(range(5)).plan_pass().length is None  # endless


def test_state_after_counts_units_of_a_pass_on_every_rank():
    s = RandomSampler(10, seed=2, num_replicas=2, rank=0)
    plan = s.plan_pass()
    state = s.state_after(plan, 3)
    assert (state["epoch"], state["position"], state["num_replicas"]) == (0, 6, 2)
    assert s.state_after(plan, 4, finished=True)["position"] == 10  # at least the end of the pass
    resumed = RandomSampler(10, seed=2, num_replicas=2, rank=0)
    resumed.load_state_dict(state)
    assert list(resumed) == list(RandomSampler(10, seed=2, num_replicas=2, rank=0))[3:]


def test_bookmark_seek_and_state_at():
    s = RandomSampler(12, seed=1)
    take(s, 5)
    here = s.bookmark()
    assert (here.epoch, here.position, here.epoch_arg, here.requested) == (0, 5, None, None)
    assert s.state_dict() == s.state_at(here)
    s.set_epoch(2)  # pending: the next pass starts epoch 2 from its beginning
    assert s.bookmark().requested == 2 and s.bookmark().effective() == (2, 0)
    assert s.state_dict() == s.state_at(s.bookmark()) and s.state_dict()["epoch"] == 2
    s.seek(here)  # back to where it stood, without the request
    assert list(s) == list(RandomSampler(12, seed=1))[5:]
    s.seek(Bookmark(0, 3, epoch_arg=0, requested=0))  # set_epoch(the same epoch) keeps the position
    assert list(s) == RandomSampler(12, seed=1).permutation(0).take(torch.arange(3, 12)).tolist()
