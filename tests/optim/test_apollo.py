"""Apollo / ApolloMini: the update rule (AdamW path, scaling, limiter, projections), param
groups, state_dict / load_state_dict, devices, odd shapes and option validation."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_utils.io import load_state, save_state
from lightning_utils.optim import Apollo, ApolloMini
from lightning_utils.optim.projection import projection_seed, random_projection


def _param(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))


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


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _trained(params, **options):
    opt = Apollo(params, lr=1e-2, **options)
    _grads(params, 0)
    opt.step()
    return opt


def _snapshot(opt):
    return {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()}, [
        {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups
    ]


def _same(a, b):
    sa, ga = a
    sb, gb = b
    assert ga == gb and sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].keys() == sb[key].keys()
        for name, value in sa[key].items():
            other = sb[key][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


# --- rank 0 and 0-D/1-D tensors: AdamW with eps after the sqrt and decoupled weight decay -----


def test_rank0_single_step_matches_known_values():
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


def test_adamw_routed_parameters_do_not_get_sqrt_scale():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    p.grad = torch.tensor([0.5])
    ApolloMini([p], lr=0.1).step()  # scale=128, but a 1-D tensor is plain AdamW
    assert p.item() == pytest.approx(0.9000064, abs=2e-7)


# --- tensor and channel scaling ---------------------------------------------------------------


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


# --- norm-growth limiter and bias correction --------------------------------------------------


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


def test_bias_correction_and_limiter_match_a_direct_formula_over_steps():
    """Channel APOLLO, several steps, against the formula written out with plain ops."""
    torch.manual_seed(0)
    m, n, r = 12, 7, 3
    p = _param(m, n)
    start = p.detach().clone()
    grads = [torch.randn(m, n) * (10.0 if s == 2 else 1.0) for s in range(4)]
    lr, betas, eps, wd, scale = 1e-2, (0.8, 0.95), 1e-6, 0.05, 2.0
    opt = Apollo([p], lr=lr, betas=betas, eps=eps, weight_decay=wd, rank=r, scale=scale, update_proj_gap=2)
    w = start.clone()
    mom = torch.zeros(m, r)
    sq = torch.zeros(m, r)
    prev = None
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        proj = random_projection((m, n), "right", r, projection_seed(1, (t - 1) // 2))
        low = g @ proj.T
        mom = betas[0] * mom + (1 - betas[0]) * low
        sq = betas[1] * sq + (1 - betas[1]) * low * low
        normed = mom / (sq.sqrt() + eps)
        s = normed.norm(dim=1, keepdim=True) / (low.norm(dim=1, keepdim=True) + 1e-8)
        u = g * s
        norm = u.norm()
        if prev is not None:
            limiter = max(norm.item() / (prev + 1e-8), 1.01) / 1.01
            u = u / limiter
            norm = norm / limiter
        prev = norm.item()
        step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        w = (w - step_size * math.sqrt(scale) * u) * (1 - lr * wd)
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)
        assert opt.state[p]["scaling_grad"].item() == pytest.approx(prev, rel=1e-5)


# --- projection seeding and refresh -----------------------------------------------------------


def _projected_grad(opt, p, exp_avg_before):
    beta1 = opt.param_groups[0]["betas"][0]
    return (opt.state[p]["exp_avg"] - beta1 * exp_avg_before) / (1 - beta1)


def test_param_k_first_uses_seed_k_counting_gradless_params_across_groups():
    r = 8
    frozen = _param(5, 5, seed=10)  # parameter 1: never gets a gradient
    a = _param(40, 24, seed=11)  # parameter 2: m >= n -> right projection (r, n)
    b = _param(24, 40, seed=12)  # parameter 3, second group: m < n -> left projection (m, r)
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


# --- SVD projections --------------------------------------------------------------------------


def test_svd_rank_above_the_smaller_dimension_keeps_its_basis_for_the_gap():
    # proj_type="right" on a wide 4x16 matrix: the SVD has only 4 right singular vectors, so a
    # rank-8 basis does not exist; the rank must clamp to 4 and the basis be kept for the gap.
    p = _param(4, 16)
    opt = Apollo([p], lr=1e-3, rank=8, proj="svd", proj_type="right", update_proj_gap=100)
    _grads([p], 1)
    opt.step()
    basis = opt.state[p]["projection"].clone()
    assert basis.shape == (4, 16)
    assert opt.state[p]["exp_avg"].shape == (4, 4)
    for seed in (2, 3):
        _grads([p], seed)
        opt.step()
        assert torch.equal(opt.state[p]["projection"], basis)


# A slice of U or V^T that happened to be contiguous would keep the whole factor alive and
# torch.save would write all of it; LAPACK's output layout decides, so the basis is copied.
@pytest.mark.parametrize(("shape", "basis_shape"), [((64, 32), (4, 32)), ((32, 64), (32, 4))])
def test_svd_basis_in_state_owns_only_its_own_storage(shape, basis_shape):
    p = _param(*shape)
    opt = Apollo([p], lr=1e-3, rank=4, proj="svd")
    _grads([p], 0)
    opt.step()
    basis = opt.state[p]["projection"]
    assert basis.shape == basis_shape and basis.is_contiguous()
    assert basis.untyped_storage().nbytes() == basis.numel() * basis.element_size()


# --- presets, defaults and param groups -------------------------------------------------------


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
    "update_proj_gap": 200,  # not 1: a projection is kept for 200 steps unless asked otherwise
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


def test_each_group_follows_its_own_options_bit_for_bit():
    options_a = {"rank": 3, "scale_type": "channel", "proj_type": "reverse_std", "betas": (0.8, 0.9), "eps": 1e-5}
    options_b = {
        "rank": 2,
        "scale_type": "tensor",
        "scale": 16.0,
        "update_proj_gap": 2,
        "weight_decay": 0.1,
        "lr": 3e-2,
    }
    a, b, c = _param(12, 8, seed=1), _param(8, 12, seed=2), _param(5, seed=3)
    together = Apollo([{"params": [a], **options_a}, {"params": [b, c], **options_b}], lr=1e-2)
    a2, b2, c2 = (torch.nn.Parameter(x.detach().clone()) for x in (a, b, c))
    alone_a = Apollo([a2], lr=1e-2, **options_a)
    # a placeholder keeps b2 at index 2, so its projection seed matches b's
    placeholder = torch.nn.Parameter(torch.zeros(1))
    alone_b = Apollo([{"params": [placeholder]}, {"params": [b2, c2], **options_b}], lr=1e-2)
    for seed in range(4):
        _grads([a, b, c], seed)
        _grads([a2, b2, c2], seed)
        together.step()
        alone_a.step()
        alone_b.step()
    for x, y in ((a, a2), (b, b2), (c, c2)):
        assert torch.equal(x.detach(), y.detach())


def test_a_step_without_gradient_leaves_parameter_and_state_alone():
    a, b = _param(16, 8), _param(16, 8, seed=1)
    opt = Apollo([a, b], lr=1e-2, rank=2, update_proj_gap=2, weight_decay=0.1)
    ref_b = torch.nn.Parameter(b.detach().clone())
    ref = Apollo([torch.nn.Parameter(torch.zeros(1)), ref_b], lr=1e-2, rank=2, update_proj_gap=2, weight_decay=0.1)
    for seed in range(4):
        _grads([a, b], seed)
        if seed == 1:
            a.grad = None  # e.g. zero_grad(set_to_none=True) and an unused branch
        before = a.detach().clone()
        opt.step()
        ref_b.grad = b.grad.clone()
        ref.step()
        if seed == 1:
            assert torch.equal(a.detach(), before)
    assert opt.state[a]["step"] == 3 and opt.state[b]["step"] == 4
    assert torch.equal(b.detach(), ref_b.detach())


# --- state_dict and load_state_dict -----------------------------------------------------------


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


def test_load_state_dict_with_mismatched_shapes_is_a_clear_error_and_changes_nothing():
    source = _trained([_param(8, 4), _param(4)], rank=2)
    target_params = [_param(4), _param(8, 4)]  # same count, shapes swapped
    target = _trained(target_params, rank=2)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=r"parameter #1.*exp_avg.*\(8, 2\).*\(4,\)"):
        target.load_state_dict(source.state_dict())
    _same(_snapshot(target), before)


def test_load_state_dict_with_a_different_rank_in_the_saved_groups_fits_its_moments():
    # The saved group options come with the saved state: rank 2 moments under a saved rank of 2
    # load fine into an optimizer built with rank 3 (the group then says rank 2).
    params = [_param(8, 4)]
    source = _trained(params, rank=2)
    target = Apollo(params, lr=1e-2, rank=3)
    target.load_state_dict(source.state_dict())
    assert target.param_groups[0]["rank"] == 2
    _grads(params, 5)
    target.step()


def test_load_state_dict_from_another_optimizer_is_a_clear_error():
    p = _param(8, 4)
    adamw = torch.optim.AdamW([p])
    _grads([p], 0)
    adamw.step()
    opt = Apollo([p], rank=2)
    with pytest.raises(ValueError, match=r"parameter #1.*'seed'.*Apollo"):
        opt.load_state_dict(adamw.state_dict())
    assert len(opt.state) == 0


def test_load_state_dict_fills_options_missing_from_an_older_state_dict():
    params = [_param(8, 4)]
    source = _trained(params, rank=2)
    saved = source.state_dict()
    for group in saved["param_groups"]:
        del group["min_numel"], group["exclude_dims"]
    target = Apollo(params, lr=1e-2, rank=2, min_numel=0)
    target.load_state_dict(saved)
    assert target.param_groups[0]["min_numel"] == 0 and target.param_groups[0]["exclude_dims"] == ()
    _grads(params, 1)
    target.step()


def test_load_state_dict_with_an_invalid_saved_option_changes_nothing():
    params = [_param(8, 4)]
    source = _trained(params, rank=2)
    saved = source.state_dict()
    saved["param_groups"][0]["scale_type"] = "row"
    target = _trained(params, rank=2)
    before = _snapshot(target)
    with pytest.raises(ValueError, match="scale_type"):
        target.load_state_dict(saved)
    _same(_snapshot(target), before)


def test_deepcopy_and_named_parameters():
    model = torch.nn.Linear(8, 4)
    opt = Apollo(model.named_parameters(), rank=2)
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    clone = copy.deepcopy(opt)
    clone.step()  # the projection cache is rebuilt in the copy


# --- odd shapes, dtypes and layouts never crash -----------------------------------------------


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


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (0, 0), (0, 3, 3), (2, 0, 3)])
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_empty_parameters_step_without_error(shape, scale_type):
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = Apollo([p, _param(6, 4)], lr=1e-2, rank=4, scale_type=scale_type)
    for _ in range(2):
        p.grad = torch.zeros(shape)
        opt.param_groups[0]["params"][1].grad = torch.ones(6, 4)
        opt.step()
    assert p.shape == shape and opt.state[p]["step"] == 2


def test_channels_last_conv_weight_matches_the_contiguous_one():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3)
    twin = torch.nn.Conv2d(4, 8, 3)
    twin.load_state_dict(conv.state_dict())
    conv = conv.to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    opts = [Apollo(m.parameters(), lr=1e-2, rank=3, weight_decay=0.1) for m in (conv, twin)]
    for seed in range(3):
        x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(seed))
        for module, opt in zip((conv, twin), opts):
            opt.zero_grad()
            module(x.contiguous(memory_format=torch.channels_last) if module is conv else x).square().sum().backward()
            opt.step()
    assert not conv.weight.is_contiguous()  # updated in place, layout kept
    torch.testing.assert_close(conv.weight.detach(), twin.weight.detach(), rtol=1e-5, atol=1e-6)


def test_zero_gradient_gives_a_finite_zero_update():
    p = _param(16, 8)
    opt = Apollo([p], lr=1e-2, rank=4)
    for _ in range(2):
        delta = _step_delta(opt, p, torch.zeros_like(p))
        assert torch.isfinite(delta).all() and delta.abs().max() == 0


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


def test_mini_state_is_under_5_percent_of_adamw():
    p = _param(512, 512)
    adamw, mini = torch.optim.AdamW([p]), ApolloMini([p])
    p.grad = _grad_like(p, 0)
    adamw.step()
    mini.step()
    adamw_bytes = sum(v.numel() * v.element_size() for v in adamw.state[p].values() if v.ndim > 0)
    assert _state_bytes(mini) < 0.05 * adamw_bytes


# --- CUDA and CPU agree -----------------------------------------------------------------------


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_cuda_steps_match_cpu_steps(scale_type):
    cpu = [_param(64, 32, seed=1), _param(32, 64, seed=2), _param(32, seed=3)]
    cuda = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    options = {"lr": 1e-2, "rank": 8, "scale_type": scale_type, "update_proj_gap": 2, "weight_decay": 0.01}
    o_cpu, o_cuda = Apollo(cpu, **options), Apollo(cuda, **options)
    for seed in range(4):
        _grads(cpu, seed)
        for p, q in zip(cpu, cuda):
            q.grad = p.grad.cuda()
        o_cpu.step()
        o_cuda.step()
    for p, q in zip(cpu, cuda):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-4, atol=1e-5)


# --- step: closure, sparse gradients, state that no longer fits the options -------------------


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


def test_changing_rank_after_state_exists_is_a_clear_error():
    p = _param(16, 8)
    opt = Apollo([p], rank=2)
    _step_delta(opt, p, _grad_like(p, 0))
    opt.param_groups[0]["rank"] = 4
    with pytest.raises(RuntimeError, match="rank"):
        _step_delta(opt, p, _grad_like(p, 1))


def test_step_rejects_bad_state_before_touching_any_parameter():
    a, b = _param(8, 4), _param(8, 4, seed=1)
    opt = Apollo([{"params": [a]}, {"params": [b]}], lr=1e-2, rank=2)
    _grads([a, b], 0)
    opt.step()
    opt.param_groups[1]["rank"] = 3  # b's moments (8, 2) no longer fit; a, updated first, is fine
    before = (a.detach().clone(), b.detach().clone())
    _grads([a, b], 2)
    with pytest.raises(RuntimeError, match="rank"):
        opt.step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
    assert opt.state[a]["step"] == 1


# --- validation -------------------------------------------------------------------------------


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


@pytest.mark.parametrize("shape", [(8,), (8, 4)])
def test_complex_parameters_are_rejected_with_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"param group 0.*complex"):
        Apollo([_param(*shape, dtype=torch.complex64)], rank=2)


def test_rejected_add_param_group_leaves_the_optimizer_unchanged():
    opt = Apollo([_param(4, 4)], rank=2)
    extra = _param(4, 4, seed=1)
    with pytest.raises(ValueError, match="rank"):
        opt.add_param_group({"params": [extra], "rank": -1})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [extra], "rank": 1})  # the same tensor is still addable
    assert len(opt.param_groups) == 2
