"""lightning_utils.modules.offload on CPU: gradient parity, saved inputs, host-copy bookkeeping, wrapping.

Sections follow the package: the autograd function (``offload.function``, with ``offload.pytree``),
the host copies (``offload.host_copy``, with a recording fake of the CUDA stream API) and the
module wrapping (``offload.wrap``). The real CUDA path: ``tests/modules/test_offload_cuda.py``;
the Lightning callback: ``tests/callbacks/test_activation_offload.py``.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from helpers.blocks import Block, D
from torch import nn

from lightning_utils.modules.offload import (
    apply_activation_offload,
    is_offloaded,
    offloaded_checkpoint,
    remove_activation_offload,
)


class TupleBlock(nn.Module):
    """Keyword tensor argument, tuple output with a non-tensor and an integer tensor."""

    def __init__(self, d: int = D):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.drop = nn.Dropout(0.2)

    def forward(self, x, *, gate=None, extra=None):
        y = self.drop(torch.tanh(self.fc(x)))
        if gate is not None:
            y = y * gate
        aux = {"sum": y.sum(dim=-1), "argmax": y.argmax(dim=-1), "tag": "ok"}
        if extra is not None:
            y = y + extra[0] * extra[1]
        return y, aux, None


def _grads(model: nn.Module):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a: dict, b: dict, atol: float = 1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def _stack(n: int = 3, p: float = 0.3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(p=p) for _ in range(n)])


def _run(model, x, seed=1):
    torch.manual_seed(seed)
    out = model(x)
    loss = (out**2).mean()
    loss.backward()
    return out.detach(), loss.detach()


# ---------------------------------------------------------------------------------------------
# offload.function (with offload.pytree): gradients, RNG and autocast replay, saved inputs, errors.
def test_gradients_match_plain_run_with_dropout():
    plain = _stack()
    off = copy.deepcopy(plain)
    wrapped = apply_activation_offload(off, Block)
    assert wrapped == ["0", "1", "2"]
    x = torch.randn(5, D, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out_a, _loss_a = _run(plain, x)
    out_b, _loss_b = _run(off, x2)
    torch.testing.assert_close(out_a, out_b, atol=1e-6, rtol=0)
    _assert_same(_grads(plain), _grads(off))
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=0)
    # each block ran twice: the no-grad forward and the recompute in backward
    assert [b.calls for b in off] == [2, 2, 2]
    assert [b.calls for b in plain] == [1, 1, 1]


def test_rng_stream_after_step_is_unchanged():
    plain, off = _stack(), _stack()
    apply_activation_offload(off, Block)
    x = torch.randn(4, D)
    _run(plain, x)
    after_plain = torch.rand(3)
    _run(off, x)
    after_off = torch.rand(3)
    torch.testing.assert_close(after_plain, after_off)


def test_only_inputs_are_saved_and_cpu_offload_is_a_no_op():
    """The autograd graph of an offloaded block holds only its input (by reference on CPU)."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    plain, off = _stack(p=0.0), _stack(p=0.0)
    apply_activation_offload(off, Block)
    x = torch.randn(8, D, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plain(x).sum()
    n_plain = len(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        off(x).sum()
    # one saved tensor per block (its input); the plain stack saves several per block
    assert len(saved) == 3 < n_plain
    assert saved[0].data_ptr() == x.data_ptr()  # CPU: kept by reference, no copy


def test_torch_autograd_grad_and_no_grad_requiring_input():
    """Parameters get gradients even when no input requires grad (e.g. after a frozen embedding),
    and torch.autograd.grad works (gradients flow through the autograd function itself)."""
    plain, off = _stack(), _stack()
    apply_activation_offload(off, Block)
    x = torch.randn(4, D)  # requires_grad=False
    _run(plain, x)
    _run(off, x)
    _assert_same(_grads(plain), _grads(off))

    torch.manual_seed(3)
    ga = torch.autograd.grad(plain(x).pow(2).sum(), list(plain.parameters()))
    torch.manual_seed(3)
    gb = torch.autograd.grad(off(x).pow(2).sum(), list(off.parameters()))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_kwargs_tuple_outputs_and_nested_structures():
    torch.manual_seed(0)
    plain = TupleBlock()
    off = copy.deepcopy(plain)
    apply_activation_offload(off, TupleBlock)
    x = torch.randn(3, D, requires_grad=True)
    gate = torch.rand(3, D, requires_grad=True)
    e0, e1 = torch.randn(3, D, requires_grad=True), torch.randn(D, requires_grad=True)
    results = []
    for model in (plain, off):
        ins = [t.detach().clone().requires_grad_(True) for t in (x, gate, e0, e1)]
        torch.manual_seed(5)
        y, aux, none = model(ins[0], gate=ins[1], extra=(ins[2], ins[3]))
        assert none is None and aux["tag"] == "ok" and aux["argmax"].dtype == torch.int64
        assert not aux["argmax"].requires_grad
        (y.sum() + (aux["sum"] ** 2).sum()).backward()
        results.append(([t.grad for t in ins], _grads(model), y.detach()))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    _assert_same(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][2], results[1][2])


def test_no_grad_and_eval_do_not_recompute():
    off = _stack()
    apply_activation_offload(off, Block)
    x = torch.randn(4, D, requires_grad=True)
    with torch.no_grad():
        y = off(x)
    assert not y.requires_grad and y.grad_fn is None
    with torch.inference_mode():
        off(x)
    off.eval()
    with torch.no_grad():
        off(x)
    assert [b.calls for b in off] == [3, 3, 3]
    # eval mode with grad enabled still checkpoints and gives plain gradients
    plain = _stack()
    plain.eval()
    _run(plain, x.detach())
    for b in off:
        b.calls = 0
    _run(off, x.detach())
    _assert_same(_grads(plain), _grads(off))
    assert [b.calls for b in off] == [2, 2, 2]


def test_frozen_block_with_frozen_input_runs_plainly():
    off = _stack()
    apply_activation_offload(off, Block)
    off.requires_grad_(False)
    y = off(torch.randn(2, D))
    assert not y.requires_grad
    assert [b.calls for b in off] == [1, 1, 1]


def test_cpu_autocast_is_replayed():
    plain, off = _stack(), _stack()
    apply_activation_offload(off, Block)
    x = torch.randn(4, D)
    fp32 = _stack()
    _run(fp32, x)
    for model in (plain, off):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().pow(2).mean().backward()
    _assert_same(_grads(plain), _grads(off))
    # autocast really changed the numbers, so a recompute in fp32 would have been caught
    assert not torch.allclose(_grads(plain)["0.fc1.weight"], _grads(fp32)["0.fc1.weight"], atol=1e-6)


def test_autocast_state_of_forward_is_replayed_even_when_backward_runs_under_autocast():
    """The recompute must use the forward's autocast state, also when that state was *off* and
    backward is called inside an autocast region."""
    plain, off = _stack(), _stack()
    apply_activation_offload(off, Block)
    x = torch.randn(4, D)
    for model in (plain, off):
        torch.manual_seed(1)
        out = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.pow(2).mean().backward()
    _assert_same(_grads(plain), _grads(off))


def test_batchnorm_running_stats_updated_once():
    """The recompute must not update running statistics a second time."""

    class BNBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, D)
            self.bn = nn.BatchNorm1d(D)
            self.bn_cumulative = nn.BatchNorm1d(D, momentum=None)

        def forward(self, x):
            return x + self.bn_cumulative(self.bn(self.fc(x)))

    torch.manual_seed(0)
    plain = nn.Sequential(BNBlock(), BNBlock())
    off = copy.deepcopy(plain)
    apply_activation_offload(off, BNBlock)
    for _step in range(2):
        x = torch.randn(8, D)
        plain(x).pow(2).sum().backward()
        off(x).pow(2).sum().backward()
    _assert_same(_grads(plain), _grads(off))
    for (k, a), b in zip(plain.state_dict().items(), off.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=k)


def test_running_stats_of_any_layer_that_tracks_them_are_updated_once():
    """Not only torch's BatchNorm classes: any layer in training mode with a true
    ``track_running_stats`` and ``running_mean`` / ``running_var`` / ``num_batches_tracked``
    tensors gets its statistics put back after the recompute."""

    class MeanTracker(nn.Module):
        def __init__(self):
            super().__init__()
            self.track_running_stats = True
            self.register_buffer("running_mean", torch.zeros(D))
            self.register_buffer("num_batches_tracked", torch.tensor(0))

        def forward(self, x):
            if self.training:
                with torch.no_grad():
                    self.running_mean.mul_(0.9).add_(0.1 * x.mean(0))
                    self.num_batches_tracked.add_(1)
            return x - self.running_mean

    class TrackerBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, D)
            self.track = MeanTracker()

        def forward(self, x):
            return self.track(self.fc(x))

    torch.manual_seed(0)
    plain = nn.Sequential(TrackerBlock(), TrackerBlock())
    off = copy.deepcopy(plain)
    apply_activation_offload(off, TrackerBlock)
    for _ in range(2):
        x = torch.randn(8, D)
        plain(x).pow(2).sum().backward()
        off(x).pow(2).sum().backward()
    _assert_same(_grads(plain), _grads(off))
    assert int(off[0].track.num_batches_tracked) == 2
    for (k, a), b in zip(plain.state_dict().items(), off.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=k)


def test_unregistered_parameter_is_reported():
    hidden = nn.Parameter(torch.randn(D))

    class UsesClosure(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, D)

        def forward(self, x):
            return self.fc(x) * hidden

    m = UsesClosure()
    apply_activation_offload(m, UsesClosure)
    with pytest.raises(RuntimeError, match="neither one of its inputs nor one of its registered parameters"):
        m(torch.randn(2, D)).sum().backward()


def test_in_place_change_of_saved_input_is_caught():
    off = _stack(p=0.0)
    apply_activation_offload(off, Block)
    x = torch.randn(2, D, requires_grad=True)
    h = x * 2
    y = off(h)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_double_backward_is_refused_clearly():
    """create_graph=True would silently give gradients without a graph (a gradient penalty
    would contribute nothing): refuse it, saying why."""
    off = _stack(p=0.0)
    apply_activation_offload(off, Block)
    x = torch.randn(3, D, requires_grad=True)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(off(x).sum(), x, create_graph=True)


def test_inputs_saved_by_reference_are_freed_by_backward():
    import weakref

    off = _stack(p=0.0)
    apply_activation_offload(off, Block)
    x = torch.randn(3, D, requires_grad=True)
    h = x * 2
    saved = weakref.ref(h)
    out = off(h)
    del h
    assert saved() is not None  # the block's input is what the graph keeps
    out.sum().backward()
    assert saved() is None, "the saved input outlived the backward"
    assert out.grad_fn is not None  # (the output and its graph are still held)


def test_functional_form_with_explicit_params():
    w = torch.randn(D, D, requires_grad=True)
    x = torch.randn(3, D, requires_grad=True)

    def fn(a, *, scale):
        return torch.tanh(a @ w) * scale

    ref = torch.autograd.grad(fn(x, scale=2.0).sum(), (x, w))
    got = torch.autograd.grad(offloaded_checkpoint(fn, x, scale=2.0, params=[w]).sum(), (x, w))
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# offload.host_copy: the copies, events and prefetch order, with a recording fake of the CUDA
# stream API that treats CPU tensors as offloadable. The real CUDA path: test_offload_cuda.py.
class _FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event):
        self.log.append(("wait_event", self.name, event))


class _FakeOps:
    device_types = ("cpu",)

    def __init__(self):
        self.log = []
        self.compute = _FakeStream("compute", self.log)
        self.side = _FakeStream("side", self.log)
        self.events = 0

    def current_stream(self, device):
        return self.compute

    def side_stream(self, device):
        return self.side

    def use_stream(self, stream):
        import contextlib

        self.log.append(("use", stream.name))
        return contextlib.nullcontext()

    def record_event(self, stream):
        self.events += 1
        self.log.append(("event", stream.name, self.events))
        return self.events

    def record_stream(self, t, stream):
        self.log.append(("record_stream", stream.name))

    def host_buffer(self, t, pin_memory):
        return torch.empty(t.shape, dtype=t.dtype)


@pytest.fixture
def fake_ops(monkeypatch):
    from lightning_utils.modules.offload import host_copy

    ops = _FakeOps()
    monkeypatch.setattr(host_copy, "_ops", ops)
    yield ops
    assert host_copy._order == [] or all(r() is None for r in host_copy._order)


def test_offload_bookkeeping_with_fake_streams(fake_ops):
    import weakref

    plain, off = _stack(), _stack()
    apply_activation_offload(off, Block)
    x = torch.randn(4, D, requires_grad=True)
    _run(plain, x)
    x2 = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1)
    h = x2 * 1.0
    source = weakref.ref(h)
    out = off(h)
    del h
    assert source() is None  # the offloaded input is not kept alive by the graph
    log = fake_ops.log
    # three blocks: each copy waits for compute, runs on the side stream, records an event,
    # and protects its source from reuse with record_stream(side)
    assert log.count(("wait_stream", "side", "compute")) == 3
    assert log.count(("record_stream", "side")) == 3
    assert [e for e in log if e[0] == "event"] == [("event", "side", i) for i in (1, 2, 3)]
    log.clear()
    (out**2).mean().backward()
    _assert_same(_grads(plain), _grads(off))
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=0)
    # last block: plain reload after its copy event (3); then it prefetches block 1's input
    # (waits for event 2 on the side stream, new event 4); block 1 uses that prefetch and
    # prefetches block 0's (event 1 -> 5); block 0 uses its prefetch; nothing left to prefetch.
    assert [e for e in log if e[0] in ("wait_event", "event")] == [
        ("wait_event", "compute", 3),
        ("wait_event", "side", 2),
        ("event", "side", 4),
        ("wait_event", "compute", 4),
        ("wait_event", "side", 1),
        ("event", "side", 5),
        ("wait_event", "compute", 5),
    ]
    assert log.count(("record_stream", "compute")) == 2  # prefetched tensors used on compute


def test_offload_min_bytes_and_in_place_detection_with_fake_streams(fake_ops):
    off = _stack(p=0.0)
    apply_activation_offload(off, Block, min_bytes=10_000)
    off(torch.randn(2, D, requires_grad=True)).sum().backward()
    assert not any(e[0] == "event" for e in fake_ops.log)  # 128-byte inputs stay by reference

    off = _stack(p=0.0)
    apply_activation_offload(off, Block)
    h = torch.randn(2, D, requires_grad=True) * 2
    y = off(h)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_host_copies_released_by_backward_and_retain_graph_still_works(fake_ops):
    """A block's host copies live as long as autograd keeps its saved tensors: freed by the
    backward (even while the caller still holds the output), kept with retain_graph=True."""
    import gc
    import weakref

    off = _stack(p=0.0)
    apply_activation_offload(off, Block)
    x = torch.randn(4, D, requires_grad=True)
    out = off(x * 1.0)
    hosts = [weakref.ref(c.host) for c in out.grad_fn.group.copies]
    assert hosts and all(h() is not None for h in hosts)
    out.sum().backward(retain_graph=True)
    first = x.grad.clone()
    gc.collect()
    assert all(h() is not None for h in hosts)  # retained for a second backward
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2 * first)
    gc.collect()
    assert all(h() is None for h in hosts), "pinned host buffers outlived the backward"
    del out


def test_buffers_and_parameter_views_passed_as_arguments_are_not_offloaded(fake_ops):
    """A rotary cache registered as a buffer on the model and passed to every block (or a slice
    of a parameter) stays where it is: offloading it saves nothing and costs a copy per block."""

    class RopeBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, D)

        def forward(self, x, cos, pos):
            return x + self.fc(x) * cos + pos

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cos", torch.rand(64, D))
            self.pos = nn.Parameter(torch.randn(64, D))
            self.blocks = nn.ModuleList([RopeBlock(), RopeBlock()])

        def forward(self, x):
            t = x.shape[0]
            for b in self.blocks:
                x = b(x, self.cos[:t], self.pos[:t].detach())
            return x

    model = Model()
    apply_activation_offload(model, RopeBlock)
    x = torch.randn(8, D, requires_grad=True)
    out = model(x * 1.0)
    copies = [c for ctx in (out.grad_fn, out.grad_fn.next_functions[0][0]) for c in ctx.group.copies]
    assert len(copies) == 2  # one per block: x only, not the cache or the parameter slice
    out.sum().backward()
    assert model.blocks[0].fc.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# offload.wrap: which modules run offloaded, and what wrapping leaves unchanged.
def test_state_dict_keys_and_values_unchanged():
    plain = _stack()
    off = copy.deepcopy(plain)
    apply_activation_offload(off, Block)
    assert list(plain.state_dict()) == list(off.state_dict())
    off.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(off.state_dict(), strict=True)


def test_nested_targets_checkpoint_once():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Block()
            self.fc = nn.Linear(D, D)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.fc(self.inner(x))

    torch.manual_seed(0)
    plain = nn.Sequential(Outer(), Outer())
    off = copy.deepcopy(plain)
    wrapped = apply_activation_offload(off, (Outer, Block))
    assert wrapped == ["0", "1"]  # the inner Blocks are covered by their Outer
    assert not is_offloaded(off[0].inner)
    # wrapping the inner ones afterwards is harmless: they run plainly inside the outer block
    assert apply_activation_offload(off, Block) == []
    apply_activation_offload(off[0].inner, Block)
    assert is_offloaded(off[0].inner)
    x = torch.randn(4, D, requires_grad=True)
    _run(plain, x)
    _run(off, x)
    _assert_same(_grads(plain), _grads(off))
    assert [o.calls for o in off] == [2, 2]
    assert [o.inner.calls for o in off] == [2, 2]  # not 3: no double checkpoint


def test_predicate_target_and_exclude():
    off = _stack()
    names = apply_activation_offload(off, lambda name, m: isinstance(m, Block), exclude=["2"])
    assert names == ["0", "1"]


def test_copy_pickle_and_remove():
    off = _stack()
    apply_activation_offload(off, Block)
    for clone in (copy.deepcopy(off), pickle.loads(pickle.dumps(off))):
        assert all(is_offloaded(b) for b in clone)
        assert clone[0].forward.module is clone[0]
        for b in clone:
            b.calls = 0
        _run(clone, torch.randn(2, D))
        assert [b.calls for b in clone] == [2, 2, 2]
    assert remove_activation_offload(off) == ["0", "1", "2"]
    assert not any(is_offloaded(b) for b in off)


def test_copies_of_one_block_do_not_drag_the_model_along():
    model = _stack()
    apply_activation_offload(model, Block)
    block = copy.deepcopy(model[1])
    assert block.forward._root() is block  # not a copy of the whole stack
    whole = copy.deepcopy(model)
    assert whole[1].forward._root() is whole and whole[1].forward.module is whole[1]
    assert len(pickle.dumps(model[1])) < len(pickle.dumps(model)) / 2


def test_wrapping_creates_no_reference_cycle():
    """Deleting an offloaded model frees it (and its device memory) at once, without waiting for
    the cyclic garbage collector: the wrapper must not form a module <-> wrapper cycle."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        model = _stack()
        apply_activation_offload(model, Block)
        _run(model, torch.randn(2, D, requires_grad=True))
        refs = [weakref.ref(model), weakref.ref(model[0]), weakref.ref(model[0].fc1.weight)]
        del model
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def test_pickles_written_before_the_split_still_load():
    """``torch.save(model)`` of an offloaded model names the wrapper's classes by import path; a
    pickle from the release with ``lightning_utils.offload`` (one module) must still load."""
    model = _stack()
    apply_activation_offload(model, Block)
    data = pickle.dumps(model, protocol=2)  # protocol 2 spells class paths as plain text
    for new, old in (
        (b"lightning_utils.modules.offload.wrap\n_OffloadedForward", b"lightning_utils.offload\n_OffloadedForward"),
        (b"lightning_utils.modules.offload.function\nGraphCheck", b"lightning_utils.offload\n_GraphCheck"),
        (b"lightning_utils.modules.offload.function\nOffloadOptions", b"lightning_utils.offload\nOffloadOptions"),
    ):
        assert new in data
        data = data.replace(new, old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the old module path
        clone = pickle.loads(data)
    assert all(is_offloaded(b) for b in clone)
    for b in clone:
        b.calls = 0
    _run(clone, torch.randn(2, D))
    assert [b.calls for b in clone] == [2, 2, 2]
