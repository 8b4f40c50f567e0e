"""Offloaded blocks and torch.compile: the block's own forward runs compiled inside the
checkpoint (``compile_offloaded``), a block compiled in place first is refused, a compiled parent
runs the checkpoint machinery eagerly."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from lightning_utils.modules.offload import (
    apply_activation_offload,
    compile_offloaded,
    is_offload_compiled,
    is_offloaded,
    remove_activation_offload,
)


class Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(d, 16), nn.Linear(16, d), nn.Dropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(torch.relu(self.fc1(x))))


class Counting:
    """A torch.compile backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), nn.Linear(8, 2))


def _grads(net: nn.Module, steps: int = 2) -> list[dict[str, torch.Tensor]]:
    out = []
    for step in range(steps):
        net.zero_grad()
        torch.manual_seed(step)
        net(torch.randn(4, 8)).pow(2).mean().backward()
        out.append({n: p.grad.clone() for n, p in net.named_parameters()})
    return out


def test_compiled_forward_inside_the_checkpoint_gives_the_plain_gradients():
    from torch._dynamo.utils import counters

    plain = _net()
    net = copy.deepcopy(plain)
    apply_activation_offload(net, Block)
    backend = Counting()
    for block in net[:2]:
        compile_offloaded(block, backend=backend)
    counters.clear()
    for want, got in zip(_grads(plain, 1), _grads(net, 1)):
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)  # dropout replayed
    # traced for the no-grad forward and the recompute (grad mode), and for an input that needs
    # no grad (block 0) or does (block 1): never per step, never through the checkpoint machinery
    assert backend.graphs == 4
    assert _grads(net, 1) and backend.graphs == 4
    assert not counters["graph_break"]
    assert all(is_offload_compiled(b) and b._compiled_call_impl is None for b in net[:2])


def test_a_block_compiled_in_place_first_is_refused():
    net = _net()
    net[1].compile(backend="eager")
    with pytest.raises(RuntimeError, match=r"ActivationOffload: 1 \(Block\) is already compiled in place"):
        apply_activation_offload(net, Block)
    assert not is_offloaded(net[0])  # nothing half done


def test_compile_offloaded_needs_an_offloaded_module():
    with pytest.raises(ValueError, match="Block is not offloaded"):
        compile_offloaded(Block(), backend="eager")


def test_a_compiled_parent_runs_the_checkpoint_eagerly():
    plain = _net()
    net = copy.deepcopy(plain)
    apply_activation_offload(net, Block)
    net.compile(backend="eager")
    for want, got in zip(_grads(plain), _grads(net)):
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)


def test_copies_pickles_and_removal_keep_the_block_compiled():
    net = _net()
    apply_activation_offload(net, Block)
    compile_offloaded(net[0], backend="eager")
    _grads(net, 1)
    for twin in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert is_offload_compiled(twin[0]) and not is_offload_compiled(twin[1])
        for want, got in zip(_grads(net, 1), _grads(twin, 1)):
            for k in want:
                torch.testing.assert_close(got[k], want[k], atol=0, rtol=0, msg=k)
    assert remove_activation_offload(net) == ["0", "1"]
    assert not is_offloaded(net[0]) and net[0]._compiled_call_impl is not None  # compiled in place now
    assert net[1]._compiled_call_impl is None


def test_importing_the_offload_package_does_not_load_the_compiler():
    """The eager fallback for compiled callers is made when first needed: a plain import (the
    torch-only layer, the CLI) does not pay for torch._dynamo."""
    import subprocess
    import sys

    code = "import sys, lightning_utils.modules.offload; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
