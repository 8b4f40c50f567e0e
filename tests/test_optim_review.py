"""Review findings for Apollo: each test failed before its fix (see the commit history)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_utils.optim import Apollo, ApolloMini


def _param(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))


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


# --- finding 1: an SVD basis narrower than the rank was recomputed on every step ------------------


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


# --- finding 2: load_state_dict accepted moments of the wrong shape ---------------------------------


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


# --- finding 3: a foreign (AdamW) state dict gave KeyError 'correct_bias' ---------------------------


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


# --- finding 4: complex parameters got silently wrong moments (g*g, not |g|^2) ----------------------


@pytest.mark.parametrize("shape", [(8,), (8, 4)])
def test_complex_parameters_are_rejected_with_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"param group 0.*complex"):
        Apollo([_param(*shape, dtype=torch.complex64)], rank=2)


# --- finding 5: a rejected add_param_group left the bad group in the optimizer -----------------------


def test_rejected_add_param_group_leaves_the_optimizer_unchanged():
    opt = Apollo([_param(4, 4)], rank=2)
    extra = _param(4, 4, seed=1)
    with pytest.raises(ValueError, match="rank"):
        opt.add_param_group({"params": [extra], "rank": -1})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [extra], "rank": 1})  # the same tensor is still addable
    assert len(opt.param_groups) == 2


# --- pins (no bug): AdamW-routed tensors ignore `scale`, as a rank-0 group does -----------------------


def test_adamw_routed_parameters_do_not_get_sqrt_scale():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    p.grad = torch.tensor([0.5])
    ApolloMini([p], lr=0.1).step()  # scale=128, but a 1-D tensor is plain AdamW
    assert p.item() == pytest.approx(0.9000064, abs=2e-7)


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


def test_bias_correction_and_limiter_match_a_direct_formula_over_steps():
    """Channel APOLLO, several steps, against the formula written out with plain ops."""
    torch.manual_seed(0)
    m, n, r = 12, 7, 3
    p = _param(m, n)
    start = p.detach().clone()
    grads = [torch.randn(m, n) * (10.0 if s == 2 else 1.0) for s in range(4)]
    lr, betas, eps, wd, scale = 1e-2, (0.8, 0.95), 1e-6, 0.05, 2.0
    opt = Apollo([p], lr=lr, betas=betas, eps=eps, weight_decay=wd, rank=r, scale=scale, update_proj_gap=2)
    from lightning_utils.optim.projection import projection_seed, random_projection

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


# --- hardening (pin): an SVD basis in state owns only its own storage ---------------------------
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


# --- pins: per-group options, gradient-less steps ----------------------------------------------------


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


# --- pins: shapes the property test does not draw -----------------------------------------------------


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
