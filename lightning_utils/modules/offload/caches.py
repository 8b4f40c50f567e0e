"""Mutable caches handed to an offloaded block: find them, and decide how the block runs.

What it is for: a checkpointed block runs twice, once in the forward and again in backward. A
block that writes into an object it is handed (a Hugging Face ``Cache``: the model creates a
``DynamicCache`` for its blocks whenever ``use_cache`` is on, which is every model's default)
would write into it a second time during the recompute: its keys/values appended twice (the
recomputed attention then sees them twice: wrong gradients), or a cross-attention cache marked
as filled (the recompute reads the forward's gradient-free copy: gradients lost, or a shape
error). So :func:`checkpoint_call` asks :func:`plan` first:

- a Hugging Face cache that holds nothing yet, handed to a block in training mode (the ordinary
  training forward): the block runs without it (the argument becomes ``None``), which leaves its
  output unchanged and is what Hugging Face's own gradient checkpointing does; the model's
  returned cache then holds nothing for those blocks;
- any other cache (one that already holds positions, such as a prompt or a prefix-tuning cache,
  a block in eval mode with grad enabled, or an object that is not a Hugging Face ``Cache`` but
  has its ``update``/``get_seq_length`` methods): the block runs plainly, once, without
  checkpointing, so the cache is updated once and the gradients are exact.

Each case warns once per set of blocks (one ``apply_activation_offload`` call).

A Hugging Face ``Cache`` is recognised by class only when ``transformers.cache_utils`` is already
imported (an object of that class cannot exist otherwise): this module never imports
``transformers``. What it must never do: change a cache, or let a recompute run with one.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

__all__ = ["CachePlan", "find_caches", "holds_data", "is_hf_cache", "plan", "without_caches"]

# Bounds for the search of tensors inside a cache object: a cache is a short list of layers,
# each with a few tensors, so these are far above any real one and only guard against cycles
# through unrelated objects.
_MAX_DEPTH = 6
_MAX_OBJECTS = 10_000


def is_hf_cache(obj: Any) -> bool:
    """Whether ``obj`` is a ``transformers`` ``Cache`` (without importing ``transformers``)."""
    module = sys.modules.get("transformers.cache_utils")
    cache_class = getattr(module, "Cache", None) if module is not None else None
    return isinstance(cache_class, type) and isinstance(obj, cache_class)


def _looks_like_cache(obj: Any) -> bool:
    """An object with the cache protocol of ``transformers`` (``update`` and ``get_seq_length``)."""
    if isinstance(obj, (Tensor, nn.Module, type)):
        return False
    return callable(getattr(obj, "update", None)) and callable(getattr(obj, "get_seq_length", None))


def is_cache(obj: Any) -> bool:
    """Whether ``obj`` is a mutable cache that a block may write into."""
    return is_hf_cache(obj) or _looks_like_cache(obj)


def find_caches(obj: Any) -> list[Any]:
    """The caches inside ``obj`` (an argument tuple/dict), looking through tuples, lists and dicts."""
    found: list[Any] = []
    _collect(obj, found)
    return found


def _collect(obj: Any, found: list[Any]) -> None:
    if isinstance(obj, Tensor):
        return
    if isinstance(obj, (tuple, list)):
        for item in obj:
            _collect(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _collect(item, found)
    elif is_cache(obj) and not any(obj is f for f in found):
        found.append(obj)


def without_caches(obj: Any) -> Any:
    """``obj`` with every cache inside it (as :func:`find_caches` finds them) replaced by ``None``."""
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, tuple):
        items = [without_caches(item) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [without_caches(item) for item in obj]
    if isinstance(obj, dict):
        out = dict(obj)
        for key, value in obj.items():
            out[key] = without_caches(value)
        return out
    return None if is_cache(obj) else obj


def _tensors_inside(obj: Any) -> Iterator[Tensor]:
    """Every tensor reachable from ``obj`` through attributes, sequences and mappings (bounded)."""
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack and len(seen) < _MAX_OBJECTS:
        item, depth = stack.pop()
        if id(item) in seen or depth > _MAX_DEPTH:
            continue
        seen.add(id(item))
        if isinstance(item, Tensor):
            yield item
            continue
        if isinstance(item, (str, bytes, int, float, bool, type, nn.Module)) or item is None or callable(item):
            continue
        if isinstance(item, dict):
            children: list[Any] = list(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = list(item)
        else:
            children = list(getattr(item, "__dict__", {}).values())
            for cls in type(item).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if isinstance(slot, str) and hasattr(item, slot):
                        children.append(getattr(item, slot))
        stack.extend((child, depth + 1) for child in children)


def holds_data(cache: Any) -> bool:
    """Whether ``cache`` holds anything yet: a tensor with at least one element inside it.

    An empty Hugging Face cache has no tensors, or empty placeholders; a filled one, and a
    preallocated one (``StaticCache``), has real tensors, and counts as holding data."""
    return any(t.numel() > 0 for t in _tensors_inside(cache))


class CachePlan:
    """What :func:`plan` decided for one call: ``"checkpoint"`` (no cache), ``"drop"`` (run the
    checkpoint without the caches) or ``"plain"`` (run once, no checkpoint); ``warning`` is the
    message to give once for that decision, ``None`` when there is nothing to say."""

    __slots__ = ("action", "key", "warning")

    def __init__(self, action: str, key: str = "", warning: str | None = None):
        self.action = action
        self.key = key
        self.warning = warning


_CHECKPOINT = CachePlan("checkpoint")


def plan(args: tuple, kwargs: dict, module: nn.Module | None, name: str) -> CachePlan:
    """How a checkpointed call of ``module`` (``None`` for a plain function) named ``name``
    handles the caches among its arguments (see the module doc)."""
    caches = find_caches((args, kwargs))
    if not caches:
        return _CHECKPOINT
    kind = type(caches[0]).__name__
    label = f"{name or 'an offloaded block'}" + (f" ({type(module).__name__})" if module is not None else "")
    training = module is None or module.training
    if training and all(is_hf_cache(c) and not holds_data(c) for c in caches):
        return CachePlan(
            "drop",
            "drop",
            f"ActivationOffload: {label} was handed a cache ({kind}) in training; offloaded blocks run without "
            "it (recomputing them in backward would write into the cache a second time), as with "
            "Hugging Face's gradient checkpointing, so the cache the model returns holds nothing "
            "for them. Pass use_cache=False (or build the model with it: from_pretrained(..., use_cache=False)) "
            "for training to silence this; in eval mode and without grad (generate) the cache is used as usual.",
        )
    if not training:
        why = "in eval mode with grad enabled"
    elif not all(is_hf_cache(c) for c in caches):
        why = "(an object with a cache's update/get_seq_length methods)"
    else:
        why = "that already holds positions"
    return CachePlan(
        "plain",
        "plain",
        f"ActivationOffload: {label} was handed a cache ({kind}) {why}; such calls run once, without "
        "checkpointing (no activation memory is saved for them), because recomputing them in "
        "backward would write into the cache a second time.",
    )


def warn_once(decision: CachePlan, warned: set[str]) -> None:
    """Give ``decision``'s warning unless one for the same decision is in ``warned``."""
    if decision.warning is None or decision.key in warned:
        return
    warned.add(decision.key)
    warnings.warn(decision.warning, UserWarning, stacklevel=2)
