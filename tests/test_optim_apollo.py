"""Apollo / ApolloMini numerics, shapes, state and validation (reference §6, cases 33-39)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_utils.io import load_state, save_state
from lightning_utils.optim import Apollo, ApolloMini, apollo_param_groups, uses_apollo
from lightning_utils.optim.projection import projection_seed, random_projection


def _param(*shape: int, seed: int = 0) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=gen))


def _grad_like(p: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _step_delta(opt: torch.optim.Optimizer, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    before = p.detach().clone()
    p.grad = grad.clone()
    opt.step()
    return p.detach() - before


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


# --- case 33: rank 0 is AdamW with eps after the sqrt and decoupled weight decay ----------


def test_rank0_single_step_matches_reference_values():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    p.grad = torch.tensor([0.5])
    Apollo([p], lr=0.1, rank=0).step()
    assert p.item() == pytest.approx(0.9000064, abs=2e-7)

    p = torch.nn.Parameter(torch.tensor([1.0]))
    p.grad = torch.tensor([0.5])
    Apollo([p], lr=0.1, rank=0, weight_decay=0.1).step()
    assert p.item() == pytest.approx(0.8910063, abs=2e-7)


def _manual_adamw(p, grads, lr, betas, eps, wd):
    p = p.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        p = p - step_size * m / (v.sqrt() + eps)
        p = p * (1 - lr * wd)
    return p


@pytest.mark.parametrize(("shape", "options"), [((6, 5), {"rank": 0}), ((7,), {"rank": 4}), ((), {"rank": 4})])
def test_adamw_path_matches_formula_over_steps(shape, options):
    p = _param(*shape)
    start = p.detach().clone()
    grads = [_grad_like(p, s) for s in range(4)]
    opt = Apollo([p], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, **options)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = _manual_adamw(start, grads, 0.05, (0.8, 0.95), 1e-6, 0.1)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    assert opt.state[p]["exp_avg"].shape == p.shape  # full-size moments: plain AdamW


def test_correct_bias_false_uses_plain_lr():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    p.grad = torch.tensor([0.5])
    Apollo([p], lr=0.1, rank=0, correct_bias=False).step()
    # m = 0.05, v = 2.5e-4: update = 0.1 * 0.05 / (0.0158114 + 1e-6)
    assert p.item() == pytest.approx(1.0 - 0.1 * 0.05 / (math.sqrt(2.5e-4) + 1e-6), rel=1e-6)


# --- case 34/35: tensor and channel scaling ---------------------------------------------------


def _zeros(*shape: int) -> torch.nn.Parameter:
    # a zero start keeps p_new - p_old free of cancellation error
    return torch.nn.Parameter(torch.zeros(shape))


def test_tensor_scaling_is_one_scalar_times_the_gradient():
    p = _zeros(64, 32)
    g = _grad_like(p, 1)
    delta = _step_delta(ApolloMini([p], lr=1e-2), p, g)
    ratio = delta / g
    assert (ratio < 0).all()  # descent direction, c > 0
    assert (ratio.std() / ratio.abs().mean()).item() < 1e-5


@pytest.mark.parametrize(("shape", "constant_dim"), [((512, 64), 1), ((64, 512), 0)])
def test_channel_scaling_is_constant_per_row_or_column(shape, constant_dim):
    p = _zeros(*shape)
    g = _grad_like(p, 1)
    delta = _step_delta(Apollo([p], lr=1e-3, rank=16, scale_type="channel"), p, g)
    ratio = delta / g
    spread = ratio.std(dim=constant_dim) / ratio.abs().mean(dim=constant_dim)
    assert spread.max().item() < 1e-4
    # and it really varies across channels (a per-channel, not per-tensor, scale)
    per_channel = ratio.mean(dim=constant_dim)
    assert (per_channel.std() / per_channel.abs().mean()).item() > 1e-3


def test_scale_enters_as_its_square_root():
    g = _grad_like(_param(32, 16), 3)
    deltas = []
    for scale in (1.0, 4.0):
        p = _zeros(32, 16)
        deltas.append(_step_delta(Apollo([p], lr=1e-2, rank=4, scale=scale), p, g))
    torch.testing.assert_close(deltas[1], 2.0 * deltas[0], rtol=1e-5, atol=1e-8)


# --- case 36: norm-growth limiter --------------------------------------------------------------


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("gap", [1, 200])
def test_norm_growth_limiter_caps_growth_at_1_01(scale_type, gap):
    # A tiny gradient sits in the eps-dominated regime, where the update is proportional to the
    # gradient: without the limiter the x100 jump grows the update norm about x100.
    p = _zeros(48, 24)
    g = 1e-8 * _grad_like(p, 1)
    opt = Apollo([p], lr=1e-3, rank=4, scale_type=scale_type, update_proj_gap=gap, correct_bias=False)
    first_delta = _step_delta(opt, p, g)
    first = opt.state[p]["scaling_grad"].item()
    second_delta = _step_delta(opt, p, 100 * g)
    second = opt.state[p]["scaling_grad"].item()
    assert second / first == pytest.approx(1.01, rel=1e-6)
    assert (second_delta.norm() / first_delta.norm()).item() == pytest.approx(1.01, rel=1e-3)


def test_limiter_does_not_shrink_a_decreasing_update():
    p = _param(48, 24)
    g = _grad_like(p, 1)
    opt = Apollo([p], lr=1e-3, rank=4, update_proj_gap=200)
    _step_delta(opt, p, g)
    first = opt.state[p]["scaling_grad"].item()
    _step_delta(opt, p, 0.01 * g)
    assert opt.state[p]["scaling_grad"].item() < first


# --- case 37: projection seeding and refresh ----------------------------------------------------


def _projected_grad(opt, p, exp_avg_before):
    beta1 = opt.param_groups[0]["betas"][0]
    return (opt.state[p]["exp_avg"] - beta1 * exp_avg_before) / (1 - beta1)


def test_param_k_first_uses_seed_k_counting_gradless_params_across_groups():
    r = 8
    frozen = _param(5, 5, seed=10)  # #1: never gets a gradient
    a = _param(40, 24, seed=11)  # #2: m >= n -> right projection (r, n)
    b = _param(24, 40, seed=12)  # #3, second group: m < n -> left projection (m, r)
    opt = Apollo([{"params": [frozen, a]}, {"params": [b]}], lr=1e-3, rank=r)
    ga, gb = _grad_like(a, 1), _grad_like(b, 2)
    a.grad, b.grad = ga.clone(), gb.clone()
    opt.step()
    assert opt.state[a]["seed"] == 2 and opt.state[b]["seed"] == 3
    assert frozen not in opt.state
    pa = torch.randn((r, 24), generator=torch.Generator().manual_seed(2)) / math.sqrt(r)
    pb = torch.randn((24, r), generator=torch.Generator().manual_seed(3)) / math.sqrt(r)
    assert opt.state[a]["exp_avg"].shape == (40, r)
    assert opt.state[b]["exp_avg"].shape == (r, 40)
    torch.testing.assert_close(opt.state[a]["exp_avg"], 0.1 * (ga @ pa.T), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[b]["exp_avg"], 0.1 * (pb.T @ gb), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gap", [1, 200])
def test_projection_refreshes_every_update_proj_gap_steps(gap):
    r = 6
    p = _param(30, 20)
    opt = Apollo([p], lr=1e-3, rank=r, update_proj_gap=gap)
    first = random_projection((30, 20), "right", r, 1)
    for step in range(3):
        g = _grad_like(p, step)
        before = opt.state[p]["exp_avg"].clone() if p in opt.state else torch.zeros(30, r)
        _step_delta(opt, p, g)
        projected = _projected_grad(opt, p, before)
        expected_seed = projection_seed(1, step // gap)
        expected = g @ random_projection((30, 20), "right", r, expected_seed).T
        torch.testing.assert_close(projected, expected, rtol=1e-4, atol=1e-5)
        if gap == 1 and step > 0:
            assert not torch.allclose(projected, g @ first.T, rtol=1e-3, atol=1e-4)
        if gap == 200:
            torch.testing.assert_close(projected, g @ first.T, rtol=1e-4, atol=1e-5)


def test_projection_does_not_depend_on_global_rng():
    deltas = []
    for global_seed in (0, 12345):
        torch.manual_seed(global_seed)
        p = _param(32, 16)
        opt = Apollo([p], lr=1e-2, rank=4)
        deltas.append(torch.stack([_step_delta(opt, p, _grad_like(p, s)) for s in range(3)]))
    assert torch.equal(deltas[0], deltas[1])


def test_projection_seed_scheme():
    assert projection_seed(7, 0) == 7
    seeds = {projection_seed(s, k) for s in range(1, 20) for k in range(1, 20)}
    assert len(seeds) == 19 * 19 and all(0 <= s < 2**63 for s in seeds)
    assert projection_seed(3, 5) == projection_seed(3, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_projection_is_identical_on_cpu_and_cuda():
    cpu = random_projection((64, 32), "right", 8, 123)
    cuda = random_projection((64, 32), "right", 8, 123, device="cuda")
    assert torch.equal(cpu, cuda.cpu())
    p_cpu, p_cuda = _param(64, 32), _param(64, 32).cuda()
    g = _grad_like(p_cpu, 1)
    o_cpu, o_cuda = Apollo([p_cpu], lr=1e-2, rank=8), Apollo([p_cuda], lr=1e-2, rank=8)
    _step_delta(o_cpu, p_cpu, g)
    _step_delta(o_cuda, p_cuda, g.cuda())
    torch.testing.assert_close(o_cuda.state[p_cuda]["exp_avg"].cpu(), o_cpu.state[p_cpu]["exp_avg"])


# --- case 38: presets and group keys ------------------------------------------------------------

_APOLLO_DEFAULTS = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-6,
    "weight_decay": 0.0,
    "correct_bias": True,
    "rank": 256,
    "proj": "random",
    "scale_type": "channel",
    "scale": 1.0,
    "update_proj_gap": 200,  # the paper's value; the original utils defaulted to 1 (quirk 17)
    "proj_type": "std",
    "min_numel": 0,
    "exclude_dims": (),
}


def test_presets_and_defaults():
    group = Apollo([_param(4, 4)]).param_groups[0]
    assert {k: group[k] for k in _APOLLO_DEFAULTS} == _APOLLO_DEFAULTS
    mini = ApolloMini([_param(4, 4)]).param_groups[0]
    assert {k: mini[k] for k in _APOLLO_DEFAULTS} == {
        **_APOLLO_DEFAULTS,
        "rank": 1,
        "scale_type": "tensor",
        "scale": 128.0,
    }
    overridden = ApolloMini([_param(4, 4)], rank=2, scale=64, update_proj_gap=1, proj_type="left")
    g = overridden.param_groups[0]
    assert (g["rank"], g["scale"], g["update_proj_gap"], g["proj_type"]) == (2, 64, 1, "left")


def test_every_option_is_a_param_group_key():
    a, b = _param(32, 16, seed=1), _param(32, 16, seed=2)
    opt = Apollo([{"params": [a]}, {"params": [b], "rank": 0, "lr": 0.5, "update_proj_gap": 3}], rank=4)
    ga = _grad_like(a, 5)
    gb = _grad_like(b, 6)
    a.grad, b.grad = ga, gb
    opt.step()
    assert opt.state[a]["exp_avg"].shape == (32, 4)
    assert opt.state[b]["exp_avg"].shape == (32, 16)
    sd = opt.state_dict()
    assert sd["param_groups"][1]["rank"] == 0 and sd["param_groups"][1]["update_proj_gap"] == 3


# --- case 39: state is tensors and numbers; odd shapes never crash ---------------------------------


def _assert_plain_state(state_dict):
    for per_param in state_dict["state"].values():
        for key, value in per_param.items():
            assert torch.is_tensor(value) or isinstance(value, (int, float)), (key, type(value))


@pytest.mark.parametrize("suffix", [".pt", ".sft"])
@pytest.mark.parametrize("proj", ["random", "svd"])
def test_state_dict_roundtrips_weights_only_and_resumes_bit_identically(proj, suffix, tmp_path):
    def build():
        params = [_param(40, 24, seed=1), _param(24, 40, seed=2), _param(24, seed=3), _param(3, 4, 5, seed=4)]
        return params, Apollo(params, lr=1e-2, rank=4, update_proj_gap=3, proj=proj, weight_decay=0.01)

    grads = [[_grad_like(p, 10 * s + i) for i, p in enumerate(build()[0])] for s in range(6)]

    def run(params, opt, steps):
        for s in steps:
            for p, g in zip(params, grads[s]):
                p.grad = g.clone()
            opt.step()

    ref_params, ref_opt = build()
    run(ref_params, ref_opt, range(6))

    params, opt = build()
    run(params, opt, range(4))  # stop mid-gap: the cached projection must be rebuilt on resume
    _assert_plain_state(opt.state_dict())
    path = tmp_path / f"state{suffix}"
    save_state({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, path)
    # .pt: torch.load(weights_only=True); .sft: safetensors + JSON skeleton, no pickle at all
    saved = torch.load(path, weights_only=True) if suffix == ".pt" else load_state(path)
    torch.manual_seed(987654)  # any global RNG state
    new_params, new_opt = build()
    with torch.no_grad():
        for p, value in zip(new_params, saved["params"]):
            p.copy_(value)
    new_opt.load_state_dict(saved["opt"])
    run(new_params, new_opt, range(4, 6))
    for p, ref in zip(new_params, ref_params):
        assert torch.equal(p.detach(), ref.detach())


@pytest.mark.parametrize(
    "shape",
    [(128, 128), (200, 256), (256, 200), (1, 1024), (1024, 1), (300, 300), (5, 3, 3), (8, 4, 3, 3), (1, 1), (3,)],
)
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_default_rank_256_survives_odd_shapes(shape, scale_type):
    p = _param(*shape)
    opt = Apollo([p], lr=1e-3, scale_type=scale_type)
    for s in range(2):
        delta = _step_delta(opt, p, _grad_like(p, s))
        assert torch.isfinite(delta).all() and delta.abs().sum() > 0
    state = opt.state[p]
    if p.ndim >= 2:
        m = shape[0]
        n = math.prod(shape[1:])
        r = min(256, min(m, n))
        assert state["exp_avg"].shape in {(m, r), (r, n)}  # rank clamped to the projected side
    else:
        assert state["exp_avg"].shape == p.shape


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 12), min_size=0, max_size=4),
    rank=st.integers(0, 20),
    scale_type=st.sampled_from(["channel", "tensor"]),
    proj_type=st.sampled_from(["std", "reverse_std", "left", "right"]),
    proj=st.sampled_from(["random", "svd"]),
)
def test_no_shape_or_option_combination_crashes(shape, rank, scale_type, proj_type, proj):
    p = _param(*shape)
    opt = Apollo([p], lr=1e-3, rank=rank, scale_type=scale_type, proj_type=proj_type, proj=proj, update_proj_gap=2)
    for s in range(3):
        delta = _step_delta(opt, p, _grad_like(p, s))
        assert torch.isfinite(delta).all()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


def test_zero_gradient_gives_a_finite_zero_update():
    p = _param(16, 8)
    opt = Apollo([p], lr=1e-2, rank=4)
    for _ in range(2):
        delta = _step_delta(opt, p, torch.zeros_like(p))
        assert torch.isfinite(delta).all() and delta.abs().max() == 0


# --- shape rule, memory, misc ----------------------------------------------------------------------


def test_exclude_dims_and_min_numel_route_matrices_to_adamw():
    embedding, hidden, small = _param(100, 16), _param(16, 64), _param(4, 4)
    opt = Apollo([embedding, hidden, small], rank=2, exclude_dims=[100], min_numel=32)
    for i, p in enumerate((embedding, hidden, small)):
        p.grad = _grad_like(p, i)
    opt.step()
    assert opt.state[embedding]["exp_avg"].shape == (100, 16)
    assert opt.state[small]["exp_avg"].shape == (4, 4)
    assert opt.state[hidden]["exp_avg"].shape == (2, 64)
    assert not opt.uses_projection(embedding) and opt.uses_projection(hidden)
    with pytest.raises(ValueError, match="not a parameter"):
        opt.uses_projection(torch.zeros(3, 3))
    assert uses_apollo((16, 64), rank=2) and not uses_apollo((16,), rank=2)


def test_mini_state_is_under_5_percent_of_adamw():
    p = _param(512, 512)
    adamw, mini = torch.optim.AdamW([p]), ApolloMini([p])
    p.grad = _grad_like(p, 0)
    adamw.step()
    mini.step()
    adamw_bytes = sum(v.numel() * v.element_size() for v in adamw.state[p].values() if v.ndim > 0)
    assert _state_bytes(mini) < 0.05 * adamw_bytes


def test_bfloat16_params_keep_bfloat16_state():
    p = torch.nn.Parameter(torch.randn(32, 16, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(16, dtype=torch.bfloat16))
    opt = Apollo([p, b], rank=4)
    p.grad, b.grad = torch.randn_like(p), torch.randn_like(b)
    opt.step()
    assert all(v.dtype == torch.bfloat16 for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    assert torch.isfinite(p.float()).all()


def test_mixed_dtypes_in_one_adamw_group():
    a = torch.nn.Parameter(torch.randn(8))
    b = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    opt = Apollo([a, b], rank=0)
    a.grad, b.grad = torch.ones(8), torch.ones(8, dtype=torch.float64)
    opt.step()
    assert opt.state[b]["exp_avg"].dtype == torch.float64


def test_closure_loss_is_returned_and_sparse_gradients_are_rejected():
    w = torch.nn.Parameter(torch.ones(3, 2))
    opt = Apollo([w], rank=1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(6.0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = Apollo(emb.parameters(), rank=2)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_deepcopy_and_named_parameters():
    model = torch.nn.Linear(8, 4)
    opt = Apollo(model.named_parameters(), rank=2)
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    clone = copy.deepcopy(opt)
    clone.step()  # the projection cache is rebuilt in the copy


def test_changing_rank_after_state_exists_is_a_clear_error():
    p = _param(16, 8)
    opt = Apollo([p], rank=2)
    _step_delta(opt, p, _grad_like(p, 0))
    opt.param_groups[0]["rank"] = 4
    with pytest.raises(RuntimeError, match="rank"):
        _step_delta(opt, p, _grad_like(p, 1))


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("lr", -1.0),
        ("lr", "fast"),
        ("rank", -1),
        ("rank", 1.5),
        ("proj", "gaussian"),
        ("scale_type", "row"),
        ("proj_type", "full"),
        ("betas", (1.0, 0.999)),
        ("betas", (0.9, -0.1)),
        ("betas", (0.9,)),
        ("eps", -1e-8),
        ("weight_decay", -0.1),
        ("scale", 0),
        ("update_proj_gap", 0),
        ("correct_bias", "yes"),
        ("min_numel", -1),
        ("exclude_dims", "vocab"),
    ],
)
def test_bad_options_raise_value_error_naming_them(option, value):
    with pytest.raises(ValueError, match=option):
        Apollo([_param(4, 4)], **{option: value})
    with pytest.raises(ValueError, match=rf"param group 1.*{option}"):
        ApolloMini([{"params": [_param(4, 4)]}, {"params": [_param(4, 4)], option: value}])


# --- apollo_param_groups ------------------------------------------------------------------------------


class _TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.attn = torch.nn.Linear(16, 48)
        self.mlp = torch.nn.Linear(16, 64)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_apollo_param_groups_by_name():
    model = _TinyLM()
    groups = apollo_param_groups(
        model,
        include=["attn.*", "mlp.*"],
        exclude=["*.bias"],
        apollo_options={"rank": 4},
        adamw_options={"weight_decay": 0.0},
    )
    assert groups[0]["param_names"] == ["attn.weight", "mlp.weight"] and groups[0]["rank"] == 4
    assert groups[1]["rank"] == 0 and groups[1]["weight_decay"] == 0.0
    assert "frozen.weight" not in groups[1]["param_names"]
    assert set(groups[1]["param_names"]) == {
        "embed.weight",
        "attn.bias",
        "mlp.bias",
        "norm.weight",
        "norm.bias",
        "head.weight",
    }
    opt = ApolloMini(groups, lr=1e-2)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[model.attn.weight]["exp_avg"].shape == (48, 4)
    assert opt.state[model.embed.weight]["exp_avg"].shape == (50, 16)


def test_apollo_param_groups_rejects_patterns_matching_nothing():
    with pytest.raises(ValueError, match=r"\['atn\.\*'\]"):
        apollo_param_groups(_TinyLM(), include=["atn.*"])
    with pytest.raises(ValueError, match="named_parameters"):
        apollo_param_groups(list(_TinyLM().parameters()))
