"""The tensors inside a call's arguments or output, flattened out and put back.

What it is for: the autograd function of an offloaded checkpoint takes and returns a flat tuple
of tensors, while a block is called with ``(args, kwargs)`` and may return tensors anywhere
inside tuples (named tuples included), lists and dicts. ``flatten`` returns those tensors (the
leaves, in a fixed order) and a structure; ``unflatten`` rebuilds the same nesting around other
leaves (the reloaded inputs, the function's outputs). Any other object is a constant of the
structure: a tensor hidden inside one is not a leaf.

What it must never do: copy or change a tensor, or keep a leaf alive (the structure holds a
placeholder where each leaf goes, never the tensor).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor

__all__ = ["flatten", "unflatten"]

_TENSOR = object()  # placeholder in the structure for "a tensor leaf goes here"


def flatten(obj: Any) -> tuple[Any, list[Tensor]]:
    """``(structure, leaves)``: the tensors inside ``obj`` in depth-first order, and where they go."""
    leaves: list[Tensor] = []
    return _flatten(obj, leaves), leaves


def _flatten(obj: Any, leaves: list[Tensor]) -> Any:
    if isinstance(obj, Tensor):
        leaves.append(obj)
        return _TENSOR
    if isinstance(obj, tuple):
        items = tuple(_flatten(o, leaves) for o in obj)
        return ("tuple", type(obj), items)
    if isinstance(obj, list):
        return ("list", list, [_flatten(o, leaves) for o in obj])
    if isinstance(obj, dict):
        return ("dict", type(obj), [(k, _flatten(v, leaves)) for k, v in obj.items()])
    return ("const", obj)


def unflatten(structure: Any, leaves: Iterable[Tensor]) -> Any:
    """The object ``flatten`` took apart, with ``leaves`` in the places of its tensors."""
    # A plain recursive function over an explicit iterator: a self-referencing closure would form
    # a reference cycle that keeps the leaves (a block's device inputs) alive until gc runs.
    return _build(structure, iter(leaves))


def _build(s: Any, it: Iterator[Tensor]) -> Any:
    if s is _TENSOR:
        return next(it)
    kind = s[0]
    if kind == "const":
        return s[1]
    if kind == "tuple":
        items = [_build(x, it) for x in s[2]]
        cls = s[1]
        if cls is tuple:
            return tuple(items)
        if hasattr(cls, "_fields"):  # named tuple
            return cls(*items)
        return cls(items)
    if kind == "list":
        return [_build(x, it) for x in s[2]]
    if kind == "dict":
        cls = s[1]
        pairs = [(k, _build(v, it)) for k, v in s[2]]
        try:
            return cls(pairs)
        except TypeError:  # dict subclasses with other constructors
            out = cls()
            for k, v in pairs:
                out[k] = v
            return out
    raise AssertionError(f"bad structure {s!r}")
