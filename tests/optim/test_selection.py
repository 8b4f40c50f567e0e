"""Which parameters get APOLLO: the shape rule (``min_numel``, ``exclude_dims``) and
``apollo_param_groups`` by name."""

from __future__ import annotations

import pytest
import torch

from lightning_utils.optim import Apollo, ApolloMini, apollo_param_groups, uses_apollo


def _param(*shape: int, seed: int = 0) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=gen))


def _grad_like(p: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(p.shape, generator=gen, dtype=p.dtype)


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
