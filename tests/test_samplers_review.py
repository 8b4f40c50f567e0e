"""Review regressions for the samplers: set_epoch after a roll-over, awkward permutation sizes,
states that survive plain-Python serialisation."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_utils.data.samplers import KeyedPermutation, OrderedSampler, RandomSampler


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


def test_a_loader_state_given_to_a_sampler_says_so():
    from lightning_utils.data.loader import ResumableDataLoader

    loader = ResumableDataLoader(list(range(5)), batch_size=2, sampler=OrderedSampler(5))
    with pytest.raises(ValueError, match="ResumableDataLoader state .*'sampler' entry"):
        OrderedSampler(5).load_state_dict(loader.state_dict())
    OrderedSampler(5).load_state_dict(loader.state_dict()["sampler"])
