"""Checkpoint test helpers: deep equality down to the bits, saving one object in both formats, and
a class that neither ``weights_only=True`` nor a ``.sft`` accepts."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import torch

from lightning_utils.io import load_state, save_state


class Custom:
    """An arbitrary class: ``weights_only=True`` refuses it, a ``.sft`` cannot represent it."""

    def __init__(self, v: int) -> None:
        self.v = v

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.v == self.v


def assert_same(a: Any, b: Any, path: str = "root") -> None:
    """Deep equality that also checks container types, key order, dtypes, strides and bits."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), path
        assert a.requires_grad == b.requires_grad, path
        if a.numel():
            assert (
                torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))
                if a.is_contiguous()
                else torch.equal(
                    a.detach().contiguous().reshape(-1).view(torch.uint8),
                    b.detach().contiguous().reshape(-1).view(torch.uint8),
                )
            ), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path
        if isinstance(a, float):
            assert math.copysign(1, a) == math.copysign(1, b), path


def save_both(obj: Any, tmp_path: pathlib.Path, name: str = "x") -> tuple[Any, Any]:
    """Save ``obj`` as ``name.sft`` and ``name.pt``; return what loading each gives."""
    save_state(obj, tmp_path / f"{name}.sft")
    save_state(obj, tmp_path / f"{name}.pt")
    return load_state(tmp_path / f"{name}.sft"), load_state(tmp_path / f"{name}.pt", weights_only=False)


def roundtrip(obj: Any, tmp_path: pathlib.Path) -> Any:
    """Save ``obj`` in both formats, check both loads are the same object, return the ``.sft`` one."""
    sft, pt = save_both(obj, tmp_path)
    assert_same(sft, pt)
    return sft
