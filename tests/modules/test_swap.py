"""lightning_utils.modules.swap (through ``ReplaceModules.apply`` and ``replace_modules``): which
modules are replaced, weights carried over under the same keys, ties, dtypes, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_utils.callbacks.replace_modules import ReplaceModules
from lightning_utils.modules.presets import sdpa_attention
from lightning_utils.modules.swap import build_like, replace_modules


class MyLinear(nn.Linear):
    """An exact replacement: same math, a marker to tell it apart."""

    def forward(self, x):
        return super().forward(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 4)


class FreshLinear(nn.Linear):
    pass


def _to_float64(name, old):
    return FreshLinear(old.in_features, old.out_features, dtype=torch.float64)


def test_exact_replacement_identical_outputs_keys_and_policy():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 8)
    before = net.head(net.model(x))
    keys = list(net.state_dict())
    params = dict(net.named_parameters())
    cb = ReplaceModules(nn.Linear, MyLinear, include=["model"])
    assert cb.apply(net) is net
    assert cb.replaced == ["model.0", "model.2"]
    assert type(net.model[0]) is MyLinear and type(net.model[2]) is MyLinear
    assert type(net.head) is nn.Linear  # outside the policy
    assert list(net.state_dict()) == keys
    torch.testing.assert_close(net.head(net.model(x)), before, atol=0, rtol=0)
    # the very same Parameter objects (no copy, ties and optimizer references survive)
    assert all(p is params[n] for n, p in net.named_parameters())
    # applying again replaces nothing (MyLinear is itself an nn.Linear)
    cb.apply(net)
    assert cb.replaced == ["model.0", "model.2"]


def test_tied_weights_frozen_flags_dtype_and_buffers():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.out = nn.Linear(6, 10, bias=False)
            self.out.weight = self.emb.weight
            self.norm = nn.BatchNorm1d(6)
            self.frozen = nn.Linear(6, 6).requires_grad_(False)

    m = Tied().to(torch.bfloat16)
    m.norm.running_mean.fill_(3.0)
    replace_modules(m, (nn.Linear, nn.BatchNorm1d), lambda name, old: build_like(type(old), old))
    assert m.out.weight is m.emb.weight
    assert m.frozen.weight.dtype == torch.bfloat16 and not m.frozen.weight.requires_grad
    assert m.out.bias is None
    assert torch.all(m.norm.running_mean == 3.0)

    # a dtype change copies the values into new Parameters, keeping requires_grad
    lin = nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    new = ReplaceModules(nn.Linear, _to_float64).apply(nn.Sequential(lin))[0]
    assert new.weight.dtype == torch.float64 and new.weight is not lin.weight
    torch.testing.assert_close(new.weight, lin.weight.double(), atol=0, rtol=0)
    assert new.weight.requires_grad and not new.bias.requires_grad


def test_ties_survive_a_dtype_changing_replacement():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.out = nn.Linear(6, 10, bias=False)
            self.out.weight = self.emb.weight

    def to_f64(name, old):
        if isinstance(old, nn.Embedding):
            return nn.Embedding(old.num_embeddings, old.embedding_dim, dtype=torch.float64)
        return nn.Linear(old.in_features, old.out_features, bias=False, dtype=torch.float64)

    m = Tied()
    weight = m.emb.weight.detach().clone()
    keys = list(m.state_dict())
    replace_modules(m, (nn.Embedding, nn.Linear), to_f64)
    assert m.emb.weight.dtype == torch.float64
    assert m.out.weight is m.emb.weight, "the tie between two replaced modules was broken"
    assert len(list(m.parameters())) == 1 and list(m.state_dict()) == keys
    torch.testing.assert_close(m.emb.weight, weight.double(), atol=0, rtol=0)


def test_factory_class_errors_and_root():
    class NeedsRank(nn.Module):
        def __init__(self, rank):
            super().__init__()

    with pytest.raises(TypeError, match="needs 'rank'"):
        ReplaceModules(nn.Linear, NeedsRank).apply(Net())

    class NoWeights(nn.Module):
        def __init__(self, in_features, out_features):
            super().__init__()

    with pytest.raises(ValueError, match=r"has no \['weight', 'bias'\]"):
        ReplaceModules(nn.Linear, NoWeights).apply(Net())
    ReplaceModules(nn.Linear, NoWeights, copy_weights=False).apply(Net())  # allowed when asked

    with pytest.raises(TypeError, match="not an nn.Module"):
        ReplaceModules(nn.Linear, lambda n, m: 3).apply(Net())
    with pytest.raises(TypeError, match="`replacement`"):
        ReplaceModules(nn.Linear, 3)
    with pytest.raises(ValueError, match="cannot import"):
        ReplaceModules("torch.nn.NoSuchLayer", MyLinear)

    lin = nn.Linear(2, 3)
    new = ReplaceModules("torch.nn.Linear", MyLinear).apply(lin)  # the root itself
    assert type(new) is MyLinear and new.weight is lin.weight

    calls = []

    def factory(name, old):
        calls.append(name)
        return MyLinear(old.in_features, old.out_features)

    cb = ReplaceModules(lambda name, m: type(m) is nn.Linear, factory, exclude=["head"])
    net = Net()
    cb.apply(net)
    cb.apply(net)  # its own products are never replaced again
    assert calls == ["model.0", "model.2"]


def test_refuses_to_replace_a_module_already_offloaded_or_compiled():
    """Replacing a wrapped module would silently drop (or, with from_module, misroute) the
    wrapping: the SDPA module would keep running the stock forward of the old module."""
    from lightning_utils.modules.offload import apply_activation_offload

    root = nn.Sequential(nn.MultiheadAttention(16, 4, batch_first=True))
    apply_activation_offload(root, nn.MultiheadAttention)
    with pytest.raises(ValueError, match="ActivationOffload.*before"):
        ReplaceModules(nn.MultiheadAttention, sdpa_attention()).apply(root)

    root = nn.Sequential(nn.Linear(2, 2))
    root[0].compile(backend="eager")
    with pytest.raises(ValueError, match="CompileModules.*before"):
        ReplaceModules(nn.Linear, MyLinear).apply(root)
    # replacing *inside* a wrapped module is fine (the wrapper calls the new child)
    outer = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    apply_activation_offload(outer, lambda name, m: name == "0")
    ReplaceModules(nn.Linear, MyLinear).apply(outer)
    assert type(outer[0][0]) is MyLinear


def test_a_module_held_in_several_places_is_replaced_in_all_of_them():
    shared = nn.Linear(2, 2)
    root = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), shared, shared)
    inner = nn.Sequential(shared)
    root.append(inner)
    _, done = replace_modules(root, nn.Linear, MyLinear)
    assert list(done) == ["0.0", "1"]
    assert type(root[0][0]) is MyLinear and type(root[1]) is MyLinear
    assert root[1] is root[2] is inner[0] is done["1"]
    assert root[1].weight is shared.weight
