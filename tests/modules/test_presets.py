"""lightning_utils.modules.presets: SDPA attention against the stock module, and the torchao /
bitsandbytes presets (their back ends and devices where installed, clear errors where not)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from lightning_utils.callbacks.replace_modules import ReplaceModules
from lightning_utils.modules.presets import (
    SDPAMultiheadAttention,
    bnb_linear_8bit,
    bnb_stable_embedding,
    float8_supported,
    sdpa_attention,
    torchao_linear,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 4)


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


def test_sdpa_from_module_refuses_a_wrapped_module():
    from lightning_utils.modules.offload import apply_activation_offload

    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    apply_activation_offload(mha, nn.MultiheadAttention)
    with pytest.raises(ValueError, match="already transformed by ActivationOffload"):
        SDPAMultiheadAttention.from_module(mha)


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
        pytest.skip("covered by tests/modules/test_offload_cuda.py on a GPU")
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


def test_torchao_auto_falls_back_to_frozen_int8_that_sft_refuses(tmp_path, monkeypatch):
    """Where float8 is not supported, ``torchao_linear()`` ("auto") quantizes to int8 weight-only:
    the weights are frozen, and a .sft save of that state is refused, naming the key."""
    pytest.importorskip("torchao", reason="torchao not installed (extra `lowp`)")
    import lightning_utils.modules.presets as replacements
    from lightning_utils.io import save_state

    monkeypatch.setattr(replacements, "float8_supported", lambda: False)  # the fallback, on any machine
    preset = torchao_linear()
    assert preset.resolved_mode() == "int8_weight_only"
    torch.manual_seed(0)
    net = Net()
    ReplaceModules(nn.Linear, preset, exclude=["head"]).apply(net)
    for layer in (net.model[0], net.model[2]):
        assert type(layer.weight) not in (torch.Tensor, nn.Parameter)  # a torchao int8 tensor
        assert layer.weight.requires_grad is False
    assert net.head.weight.requires_grad  # the excluded head still trains
    net.head(net.model(torch.randn(4, 8))).sum().backward()
    assert net.model[0].weight.grad is None and net.head.weight.grad is not None

    path = tmp_path / "int8.sft"
    with pytest.raises(TypeError, match=r"\['model\.0\.weight'\] is a tensor subclass \w+; materialise it"):
        save_state({"state_dict": net.state_dict()}, path)
    assert list(tmp_path.iterdir()) == []


def test_torchao_int8_fallback_checkpoints_cannot_be_saved_as_sft_or_resumed(tmp_path, monkeypatch):
    pytest.importorskip("torchao", reason="torchao not installed (extra `lowp`)")
    from helpers.lightning import cpu_trainer
    from helpers.models import TinyModule, loader
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_utils.modules.presets as replacements
    from lightning_utils.callbacks import SafetensorsModelCheckpoint

    monkeypatch.setattr(replacements, "float8_supported", lambda: False)

    def fit(root, checkpoint=None, ckpt_path=None):
        replace = ReplaceModules(nn.Linear, torchao_linear(), include=["net.0"])
        trainer = cpu_trainer(root, [replace, *([checkpoint] if checkpoint else [])], max_steps=4)
        trainer.fit(TinyModule(), loader(), ckpt_path=ckpt_path)

    sft = SafetensorsModelCheckpoint(dirpath=tmp_path / "sft", every_n_train_steps=2)
    with pytest.raises(TypeError, match=r"checked when fit starts.*\['net\.0\.weight'\] is a tensor subclass"):
        fit(tmp_path, sft)  # refused before the first step, not at the first save
    assert not list((tmp_path / "sft").glob("*.sft"))
    fit(tmp_path, ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1))  # a .ckpt saves...
    # ...but torch cannot load the int8 tensor subclass back through Lightning's map_location
    with pytest.raises(RuntimeError, match="_rebuild_wrapper_subclass"):
        fit(tmp_path, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")


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
    tests/modules/test_offload_cuda.py); keys and Parameter objects stay the same."""
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
