"""ReplaceModules, the name policy, weight carry-over, presets, and a Lightning fit + resume."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import pytest
import torch
from helpers.lightning import OptimizerHoldsModelParameters, cpu_trainer
from torch import nn

from lightning_utils.callbacks.replace_modules import ReplaceModules
from lightning_utils.io import load_state
from lightning_utils.modules.presets import (
    SDPAMultiheadAttention,
    bnb_linear_8bit,
    bnb_stable_embedding,
    float8_supported,
    sdpa_attention,
    torchao_linear,
)
from lightning_utils.modules.swap import build_like, replace_modules
from lightning_utils.modules.targets import find_targets, passes_policy


class MyLinear(nn.Linear):
    """An exact replacement: same math, a marker to tell it apart."""

    def forward(self, x):
        return super().forward(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 4)


def test_policy_semantics():
    assert passes_policy(None, "anything")
    assert not passes_policy([], "anything")
    assert passes_policy(["model"], "model.0") and passes_policy(["model"], "model")
    assert not passes_policy(["model"], "models.0")  # prefix means a dotted path prefix
    assert passes_policy(["*.attn"], "layers.3.attn")
    assert not passes_policy(["model"], "model.0", exclude=["model.0"])  # exclude first
    assert passes_policy(None, "head", exclude=["model"])
    with pytest.raises(TypeError, match="`include`"):
        passes_policy([1], "x")


def test_find_targets_outermost_and_shared():
    shared = nn.Linear(2, 2)
    root = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), shared, shared)
    names = [n for n, _ in find_targets(root, (nn.Linear, nn.Sequential))]
    assert names == [""]  # the root matches and covers everything
    names = [n for n, _ in find_targets(root, nn.Linear)]
    assert names == ["0.0", "1"]  # the shared module once


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


# ---------------------------------------------------------------------------------------------
# SDPA attention
def _mha_pair(**kwargs):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, **kwargs)
    new = SDPAMultiheadAttention.from_module(ref)
    return ref, new


@pytest.mark.parametrize("batch_first", [True, False])
def test_sdpa_attention_matches_stock_forward_and_grads(batch_first):
    ref, _ = _mha_pair(batch_first=batch_first)
    torch.manual_seed(1)
    ref_copy = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    ref_copy.load_state_dict(ref.state_dict())
    new = SDPAMultiheadAttention.from_module(ref_copy)
    assert list(new.state_dict()) == list(ref.state_dict())
    n, l_q = 2, 5
    shape = (n, l_q, 16) if batch_first else (l_q, n, 16)
    x = torch.randn(shape)
    kpm = torch.tensor([[False] * 5, [False, False, False, True, True]])
    causal_bool = torch.ones(l_q, l_q, dtype=torch.bool).triu(1)
    float_mask = torch.randn(l_q, l_q)
    cases = [
        {},
        {"key_padding_mask": kpm},
        {"attn_mask": causal_bool},
        {"attn_mask": float_mask, "key_padding_mask": kpm},
        {"attn_mask": causal_bool, "is_causal": True},
        {"attn_mask": torch.randn(n * 4, l_q, l_q)},
    ]
    for kw in cases:
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_a, _ = ref(xa, xa, xa, need_weights=False, **kw)
        out_b, w = new(xb, xb, xb, **kw)
        assert w is None
        torch.testing.assert_close(out_b, out_a, atol=1e-5, rtol=1e-5, msg=str(kw.keys()))
        out_a.pow(2).sum().backward()
        out_b.pow(2).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(ref.named_parameters(), new.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_sdpa_attention_kdim_unbatched_fallback_and_encoder_layer():
    ref, new = _mha_pair(kdim=6, vdim=10, batch_first=True)
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 7, 6), torch.randn(2, 7, 10)
    torch.testing.assert_close(new(q, k, v)[0], ref(q, k, v)[0], atol=1e-5, rtol=1e-5)
    ref, new = _mha_pair()
    x = torch.randn(5, 16)  # unbatched (L, E)
    torch.testing.assert_close(new(x, x, x)[0], ref(x, x, x)[0], atol=1e-5, rtol=1e-5)
    fb = SDPAMultiheadAttention.from_module(ref, weights_fallback=True)
    assert fb(x, x, x, need_weights=True)[1] is not None
    with pytest.raises(ValueError, match="add_bias_kv"):
        SDPAMultiheadAttention.from_module(nn.MultiheadAttention(16, 4, add_bias_kv=True))

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    x = torch.randn(2, 6, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    expected = layer(x, src_mask=mask, is_causal=True)
    ReplaceModules(nn.MultiheadAttention, sdpa_attention()).apply(layer)
    assert type(layer.self_attn) is SDPAMultiheadAttention
    torch.testing.assert_close(layer(x, src_mask=mask, is_causal=True), expected, atol=1e-5, rtol=1e-5)
    # a class works as replacement too (from_module)
    enc = nn.TransformerEncoderLayer(16, 4, batch_first=True)
    ReplaceModules(nn.MultiheadAttention, SDPAMultiheadAttention).apply(enc)
    assert type(enc.self_attn) is SDPAMultiheadAttention


# ---------------------------------------------------------------------------------------------
# Presets with optional back ends
def test_presets_explain_missing_back_ends(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"lightning-utils\[lowp\]"):
        ReplaceModules(nn.Linear, torchao_linear()).apply(Net())
    with pytest.raises(ImportError, match=r"lightning-utils\[bnb\]"):
        ReplaceModules(nn.Linear, bnb_linear_8bit()).apply(Net())
    with pytest.raises(ImportError, match=r"lightning-utils\[bnb\]"):
        ReplaceModules(nn.Embedding, bnb_stable_embedding()).apply(nn.Sequential(nn.Embedding(4, 4)))
    with pytest.raises(ValueError, match="`mode`"):
        torchao_linear(mode="int4")
    with pytest.raises(TypeError, match="replaces Linear"):
        torchao_linear()("x", nn.Embedding(2, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_presets_refuse_devices_that_cannot_run_them():
    pytest.importorskip("torchao", reason="torchao not installed (extra `lowp`)")
    assert not float8_supported()
    with pytest.raises(RuntimeError, match="compute capability >= 8.9"):
        torchao_linear(mode="float8")("x", nn.Linear(4, 4))
    assert torchao_linear().resolved_mode() == "int8_weight_only"


def test_bnb_linear_needs_cuda():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (extra `bnb`)")
    if torch.cuda.is_available():
        pytest.skip("covered by tests/test_offload_cuda.py on a GPU")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        bnb_linear_8bit()("x", nn.Linear(4, 4))


def test_torchao_int8_weight_only_on_cpu():
    pytest.importorskip("torchao", reason="torchao not installed (extra `lowp`)")
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 8)
    ref = net.head(net.model(x))
    keys = list(net.state_dict())
    ReplaceModules(nn.Linear, torchao_linear(mode="int8_weight_only"), include=["model"]).apply(net)
    assert list(net.state_dict()) == keys
    assert type(net.model[0].weight).__name__ != "Parameter" or net.model[0].weight.dtype == torch.int8
    torch.testing.assert_close(net.head(net.model(x)), ref, atol=0.05, rtol=0.05)


# ---------------------------------------------------------------------------------------------
# Lightning: replace in setup, resume strictly, the optimizer holds the new parameters.
class LM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.seen_types: list[type] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        self.seen_types = [type(m) for m in self.model]
        x = x.to(self.model[0].weight.dtype)
        return (self.model(x) - x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(16, 8, generator=g)), batch_size=4
        )


class _CheckOptimizer(OptimizerHoldsModelParameters):
    def check_more(self, held, pl_module):
        assert {id(p) for p in pl_module.model[0].parameters()} <= held


_trainer = cpu_trainer


class FreshLinear(nn.Linear):
    pass


def _to_float64(name, old):
    return FreshLinear(old.in_features, old.out_features, dtype=torch.float64)


@pytest.mark.parametrize("suffix", [".ckpt", ".sft"])
def test_lightning_fit_and_strict_resume(tmp_path, suffix):
    pl.seed_everything(0)
    model = LM()
    check = _CheckOptimizer()
    # float64 replacements: the weights are copied into new Parameter objects, and the
    # optimizer must hold these, not the old ones
    cb = ReplaceModules(nn.Linear, _to_float64)
    old_ids = {id(p) for p in model.parameters()}
    trainer = _trainer(tmp_path / "a", [cb, check], 2, suffix)
    trainer.fit(model)
    assert check.ok and model.seen_types[0] is FreshLinear
    assert not ({id(p) for p in model.parameters()} & old_ids)
    ckpt = tmp_path / f"replaced{suffix}"
    trainer.save_checkpoint(ckpt)
    state = load_state(ckpt)
    assert set(state["state_dict"]) == {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"}

    resumed = LM()
    check2 = _CheckOptimizer()
    cb2 = ReplaceModules(nn.Linear, _to_float64)
    trainer2 = _trainer(tmp_path / "b", [cb2, check2], 4, suffix)
    trainer2.fit(resumed, ckpt_path=ckpt)
    assert trainer2.global_step == 4 and check2.ok
    assert resumed.seen_types[0] is FreshLinear
    # momentum buffers were restored into the optimizer that holds the new parameters
    opt = trainer2.optimizers[0]
    assert all("momentum_buffer" in opt.state[p] for p in resumed.parameters())
    # and a second entry point (validate/test call setup again) does not replace again
    cb2.setup(trainer2, resumed, "validate")
    assert cb2.replaced == ["model.0", "model.2"]


def test_callback_refuses_to_replace_the_lightning_module(tmp_path):
    cb = ReplaceModules(pl.LightningModule, MyLinear)
    with pytest.raises(ValueError, match="root module itself"):
        _trainer(tmp_path, [cb], 1).fit(LM())


def test_bnb_stable_embedding_on_cpu():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (extra `bnb`)")
    emb = nn.Sequential(nn.Embedding(10, 8, padding_idx=0)).to(torch.bfloat16)
    weight = emb[0].weight
    ReplaceModules(nn.Embedding, bnb_stable_embedding()).apply(emb)
    assert type(emb[0]).__name__ == "StableEmbedding" and emb[0].weight is weight
    assert list(emb.state_dict()) == ["0.weight", "0.norm.weight", "0.norm.bias"]
    assert emb[0].norm.weight.dtype == torch.float32 and emb[0].padding_idx == 0
    out = emb(torch.tensor([[1, 2, 0]]))
    assert out.shape == (1, 3, 8) and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert weight.grad is not None


def test_torchao_float8_construction_path(monkeypatch):
    """Builds Float8Linear modules (their forward needs a float8-capable GPU: see
    tests/test_offload_cuda.py); keys and Parameter objects stay the same."""
    pytest.importorskip("torchao", reason="torchao not installed (extra `lowp`)")
    import lightning_utils.modules.presets as replacements

    monkeypatch.setattr(replacements, "float8_supported", lambda: True)
    net = Net()
    params = dict(net.named_parameters())
    keys = list(net.state_dict())
    preset = torchao_linear()
    assert preset.resolved_mode() == "float8"
    ReplaceModules(nn.Linear, preset, exclude=["head"]).apply(net)
    assert type(net.model[0]).__name__ == "Float8Linear" and type(net.head) is nn.Linear
    assert list(net.state_dict()) == keys
    assert all(p is params[n] for n, p in net.named_parameters())


# ---------------------------------------------------------------------------------------------
# Review findings (each test failed before its fix)
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


# ---------------------------------------------------------------------------------------------
# The three module callbacks in one Trainer: order, resume, a second entry point.
class _Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(d, 16), nn.Linear(16, d), nn.Dropout(0.25)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.drop(self.fc2(torch.relu(self.fc1(x))))


class _StackLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.blocks = None
        self.head = nn.Linear(8, 8)

    def configure_model(self):
        if self.blocks is None:
            torch.manual_seed(0)
            self.blocks = nn.Sequential(_Block(), _Block())

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.head(self.blocks(x)) - x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.log("val", (self.head(self.blocks(x)) - x).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(16, 8, generator=g)), batch_size=4
        )

    val_dataloader = train_dataloader


def _three(counting):
    from lightning_utils.callbacks.activation_offload import ActivationOffload
    from lightning_utils.callbacks.compile_modules import CompileModules

    return [
        ReplaceModules(nn.Linear, MyLinear, include=["blocks"]),
        ActivationOffload(target=_Block),
        CompileModules(target=_Block, backend=counting),
    ]


def test_replace_offload_compile_in_one_trainer_fit_resume_validate(tmp_path):
    from lightning_utils.modules.offload import is_offloaded

    def counting(gm, example_inputs):
        return gm.forward

    pl.seed_everything(0)
    plain = _StackLM()
    _trainer(tmp_path / "plain", [], 3).fit(plain)

    pl.seed_everything(0)
    model = _StackLM()
    callbacks = _three(counting)
    trainer = _trainer(tmp_path / "a", [*callbacks, _CheckOptimizerAll()], 3)
    trainer.fit(model)
    replace, offload, compile_ = callbacks
    assert replace.replaced == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    assert offload.wrapped == ["blocks.0", "blocks.1"] and compile_.compiled == ["blocks.0", "blocks.1"]
    assert all(type(b.fc1) is MyLinear and is_offloaded(b) and b._compiled_call_impl is not None for b in model.blocks)
    # same training as without any of them: exact replacement, dropout replayed, eager backend
    assert list(model.state_dict()) == list(plain.state_dict())
    for (k, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=k)
    # forward + recompute per training step, one plain call per sanity-check batch (no_grad)
    assert [b.calls for b in model.blocks] == [2 * 3 + 2, 2 * 3 + 2]

    # validate (setup runs again): nothing applied twice, no recompute under no_grad
    for b in model.blocks:
        b.calls = 0
    trainer.validate(model, verbose=False)
    assert len(replace.replaced) == 4 and len(offload.wrapped) == 2 and len(compile_.compiled) == 2
    assert [b.calls for b in model.blocks] == [4, 4]  # 4 validation batches, one call each

    ckpt = tmp_path / "three.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = _StackLM()
    trainer2 = _trainer(tmp_path / "b", [*_three(counting), _CheckOptimizerAll()], 5)
    trainer2.fit(resumed, ckpt_path=ckpt)  # strict
    assert trainer2.global_step == 5
    assert set(load_state(ckpt)["state_dict"]) == set(plain.state_dict())


def test_wrong_callback_order_is_a_clear_error(tmp_path):
    from lightning_utils.callbacks.activation_offload import ActivationOffload

    class _SubBlock(_Block):
        pass

    def factory(name, old):
        new = _SubBlock()
        return new

    callbacks = [ActivationOffload(target=_Block), ReplaceModules(_Block, factory)]
    with pytest.raises(ValueError, match="put ReplaceModules before"):
        _trainer(tmp_path, callbacks, 1).fit(_StackLM())


_CheckOptimizerAll = OptimizerHoldsModelParameters


def test_sdpa_from_module_refuses_a_wrapped_module():
    from lightning_utils.modules.offload import apply_activation_offload

    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    apply_activation_offload(mha, nn.MultiheadAttention)
    with pytest.raises(ValueError, match="already transformed by ActivationOffload"):
        SDPAMultiheadAttention.from_module(mha)
