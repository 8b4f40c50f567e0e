"""CUDA-only checks of ActivationOffload and the GPU presets (skipped, with the reason, without a GPU).

Covers what the CPU tests cannot: the pinned host copy on a side stream, the event ordering and
prefetch on reload, device memory actually going down, the reload landing on the input's
device, autocast replay on CUDA, a Lightning bf16-mixed fit, and the torchao / bitsandbytes
presets when those packages are installed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

D = 256


class Block(nn.Module):
    """Deterministic ops only (no atomics), so the recompute is bit-identical to the forward."""

    def __init__(self, d: int = D, p: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class AttnBlock(nn.Module):
    def __init__(self, d: int = D, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1 if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def _stack(n=4, cls=Block):
    torch.manual_seed(0)
    return nn.Sequential(*[cls() for _ in range(n)]).cuda()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _step(model, x, seed=1):
    torch.manual_seed(seed)
    out = model(x)
    out.float().pow(2).mean().backward()
    return out.detach()


@pytest.fixture(autouse=True)
def _clean():
    torch.cuda.synchronize()
    yield
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def test_cuda_gradients_match_plain_with_dropout():
    from lightning_utils.modules.offload import apply_activation_offload
    from lightning_utils.modules.offload.host_copy import _order

    plain = _stack()
    off = copy.deepcopy(plain)
    apply_activation_offload(off, Block)
    x = torch.randn(8, 64, D, device="cuda", requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out_a = _step(plain, x)
    out_b = _step(off, x2)
    torch.testing.assert_close(out_b, out_a, atol=1e-6, rtol=1e-6)
    a, b = _grads(plain), _grads(off)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6, msg=k)
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-6, rtol=1e-6)
    assert x2.grad.device == x.device
    assert all(r() is None for r in _order)  # every group was consumed by its backward


def _rng_after(model, x):  # kept tiny: used by the RNG test below
    _step(model, x)
    return torch.rand(4, device="cuda")


def test_cuda_rng_stream_unchanged_by_recompute():
    from lightning_utils.modules.offload import apply_activation_offload

    plain, off = _stack(), _stack()
    apply_activation_offload(off, Block)
    x = torch.randn(4, 16, D, device="cuda")
    torch.testing.assert_close(_rng_after(off, x), _rng_after(plain, x), atol=0, rtol=0)


def test_saved_input_is_pinned_host_copy_made_on_side_stream():
    from lightning_utils.modules.offload import apply_activation_offload
    from lightning_utils.modules.offload.host_copy import _ops

    off = _stack(n=2)
    apply_activation_offload(off, Block)
    x = torch.randn(4, 32, D, device="cuda", requires_grad=True)
    h = off[0](x)
    node = h.grad_fn  # the autograd node of the offloaded block is its ctx
    copies = node.group.copies
    assert len(copies) == 1
    host = copies[0].host
    assert host.device.type == "cpu" and host.is_pinned()
    assert copies[0].device == x.device
    side = _ops.side_stream(x.device)
    assert side != torch.cuda.current_stream()
    copies[0].event.synchronize()
    torch.testing.assert_close(host, x.detach().cpu(), atol=0, rtol=0)
    h.sum().backward()
    assert x.grad is not None and x.grad.device == x.device


def test_unpinned_and_min_bytes_paths():
    from lightning_utils.modules.offload import apply_activation_offload

    plain = _stack(n=2)
    for kwargs in ({"pin_memory": False}, {"min_bytes": 1 << 40}, {"offload": False}):
        plain.zero_grad(set_to_none=True)
        off = copy.deepcopy(plain)
        apply_activation_offload(off, Block, **kwargs)
        x = torch.randn(2, 16, D, device="cuda", requires_grad=True)
        h = off[0](x)
        copies = h.grad_fn.group.copies
        if "pin_memory" in kwargs:
            assert len(copies) == 1 and not copies[0].host.is_pinned()
        else:
            assert copies == []  # kept on the device by reference
        _step(plain, x.detach())
        _step(off, x.detach())
        a, b = _grads(plain), _grads(off)
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6, msg=f"{kwargs} {k}")


def test_in_place_change_of_offloaded_input_is_caught():
    from lightning_utils.modules.offload import apply_activation_offload

    off = _stack(n=1)
    apply_activation_offload(off, Block)
    h = torch.randn(2, 8, D, device="cuda", requires_grad=True) * 2
    y = off(h)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_activation_memory_is_lower():
    from lightning_utils.modules.offload import apply_activation_offload

    n = 8
    plain = _stack(n=n, cls=AttnBlock)
    off = copy.deepcopy(plain)
    apply_activation_offload(off, AttnBlock)
    x = torch.randn(8, 1024, D, device="cuda")

    def peak(model):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        after_forward = torch.cuda.memory_allocated() - base
        out.float().pow(2).mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, after_forward

    peak(plain), peak(off)  # warm up kernels and allocators
    plain_peak, plain_fwd = peak(plain)
    off_peak, off_fwd = peak(off)
    print(f"peak extra memory: plain {plain_peak / 2**20:.1f} MiB, offload {off_peak / 2**20:.1f} MiB")
    assert off_fwd < 0.25 * plain_fwd  # after the forward only block outputs are on the device
    assert off_peak < 0.5 * plain_peak


def test_bf16_autocast_gradients_match():
    from lightning_utils.modules.offload import apply_activation_offload

    plain = _stack(n=3, cls=AttnBlock)
    off = copy.deepcopy(plain)
    apply_activation_offload(off, AttnBlock)
    x = torch.randn(2, 128, D, device="cuda")
    for model in (plain, off):
        torch.manual_seed(3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().pow(2).mean().backward()
    a, b = _grads(plain), _grads(off)
    for k in a:
        # same kernels, same inputs; only non-deterministic attention-backward reductions differ
        torch.testing.assert_close(b[k], a[k], atol=1e-3, rtol=1e-2, msg=k)


def test_lightning_bf16_fit_with_activation_offload(tmp_path):
    import lightning.pytorch as pl

    from lightning_utils.callbacks.activation_offload import ActivationOffload
    from lightning_utils.modules.offload import is_offloaded

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(64, D)
            self.blocks = nn.Sequential(*[AttnBlock() for _ in range(2)])
            self.head = nn.Linear(D, 64)
            self.losses = []
            self.devices_seen = set()

        def training_step(self, batch, batch_idx):
            (tokens,) = batch
            self.devices_seen.add(tokens.device.type)
            logits = self.head(self.blocks(self.embed(tokens[:, :-1])))
            loss = F.cross_entropy(logits.float().reshape(-1, 64), tokens[:, 1:].reshape(-1))
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            data = torch.randint(0, 64, (16, 65), generator=g)
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)

    def fit(callbacks):
        pl.seed_everything(0)
        model = LM()
        trainer = pl.Trainer(
            default_root_dir=tmp_path,
            accelerator="cuda",
            devices=1,
            precision="bf16-mixed",
            max_steps=4,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model)
        return model

    plain = fit([])
    off = fit([ActivationOffload(target=AttnBlock)])
    assert all(is_offloaded(b) for b in off.blocks)
    assert off.devices_seen == {"cuda"}  # (Lightning moves the model back to the CPU at teardown)
    torch.testing.assert_close(torch.tensor(off.losses), torch.tensor(plain.losses), atol=2e-2, rtol=2e-2)


def test_torchao_float8_preset():
    pytest.importorskip("torchao", reason="torchao not installed (extra `lowp`)")
    from lightning_utils.callbacks.replace_modules import ReplaceModules
    from lightning_utils.modules.presets import float8_supported, torchao_linear

    if not float8_supported():
        pytest.skip(f"float8 needs compute capability >= 8.9, this GPU has {torch.cuda.get_device_capability()}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda()
    x = torch.randn(64, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(x).float()
    keys = list(model.state_dict())
    cb = ReplaceModules(nn.Linear, torchao_linear(mode="float8"))
    cb.apply(model)
    assert cb.replaced == ["0", "2"]
    assert type(model[0]).__name__ == "Float8Linear"
    assert list(model.state_dict()) == keys
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x).float()
    out.pow(2).mean().backward()
    assert model[0].weight.grad is not None
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.1, rel


def test_torchao_int8_weight_only_preset_on_cuda():
    pytest.importorskip("torchao", reason="torchao not installed (extra `lowp`)")
    from lightning_utils.callbacks.replace_modules import ReplaceModules
    from lightning_utils.modules.presets import torchao_linear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256)).cuda().to(torch.bfloat16)
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    ref = model(x).float()
    ReplaceModules(nn.Linear, torchao_linear(mode="int8_weight_only")).apply(model)
    with torch.no_grad():
        out = model(x).float()
    assert ((out - ref).norm() / ref.norm()) < 0.05


def test_bnb_linear_8bit_and_stable_embedding_presets():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (extra `bnb`)")
    from lightning_utils.callbacks.replace_modules import ReplaceModules
    from lightning_utils.modules.presets import bnb_linear_8bit, bnb_stable_embedding

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(100, 256), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 64))

    model = build()
    tokens = torch.randint(0, 100, (8, 16))
    keys = list(model.state_dict())
    ReplaceModules(nn.Linear, bnb_linear_8bit(has_fp16_weights=True, threshold=6.0)).apply(model)
    assert type(model[1]).__name__ == "Linear8bitLt"
    assert list(model.state_dict()) == keys
    model = model.cuda().half()
    ref_model = build().cuda().half()
    out = model(tokens.cuda()).float()
    ref = ref_model(tokens.cuda()).float()
    assert ((out - ref).norm() / ref.norm()) < 0.1
    out.pow(2).mean().backward()
    assert model[1].weight.grad is not None

    emb = nn.Sequential(nn.Embedding(100, 32))
    ReplaceModules(nn.Embedding, bnb_stable_embedding()).apply(emb)
    assert type(emb[0]).__name__ == "StableEmbedding"
    assert {"0.weight", "0.norm.weight", "0.norm.bias"} <= set(emb.state_dict())
    emb.cuda()(tokens.cuda()).sum().backward()


def test_host_copy_keeps_layout_and_is_released_by_backward():
    import weakref

    from lightning_utils.modules.offload import apply_activation_offload

    off = _stack(n=2)
    apply_activation_offload(off, Block)
    x = torch.randn(32, 4, D, device="cuda", requires_grad=True)
    h = off[0](x.transpose(0, 1))  # a non-contiguous input
    copy_ = h.grad_fn.group.copies[0]
    assert copy_.host.stride() == x.transpose(0, 1).stride()
    host = weakref.ref(copy_.host)
    h.float().pow(2).sum().backward()
    torch.cuda.synchronize()
    assert host() is None and copy_.prefetched is None  # pinned memory given back, output still held
    assert x.grad is not None and x.grad.device == x.device


def test_cuda_recompute_replays_autocast_off_under_an_autocast_backward():
    from lightning_utils.modules.offload import apply_activation_offload

    plain = _stack(n=2)
    off = copy.deepcopy(plain)
    apply_activation_offload(off, Block)
    x = torch.randn(4, 16, D, device="cuda")
    for model in (plain, off):
        torch.manual_seed(2)
        out = model(x)  # fp32 forward
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out.pow(2).mean().backward()
    a, b = _grads(plain), _grads(off)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6, msg=k)


def test_replacement_with_extra_tensors_lands_on_the_old_device():
    """The replacement is built on the CPU; after the carried-over CUDA parameters are put in,
    its own extra buffers/parameters must follow them to the GPU."""
    from lightning_utils.callbacks.replace_modules import ReplaceModules

    class ScaledLinear(nn.Linear):
        def __init__(self, in_features, out_features, bias=True, dtype=None):
            super().__init__(in_features, out_features, bias=bias, dtype=dtype)
            self.register_buffer("scale", torch.ones(out_features))

        def forward(self, x):
            return super().forward(x) * self.scale

    model = nn.Sequential(nn.Linear(8, 8)).cuda()
    ReplaceModules(nn.Linear, ScaledLinear).apply(model)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
    model(torch.randn(2, 8, device="cuda"))
