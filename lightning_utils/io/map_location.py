"""Applying any ``map_location`` that ``torch.load`` accepts to tensors read from a safetensors file.

safetensors itself only takes a device; Lightning and users pass ``None``, a string, a
``torch.device``, a ``{from: to}`` dict or a callable ``(storage, location) -> storage``. Tensors
are read on CPU first and then placed, with torch's semantics for each form. This module never
reads a file, and never copies a tensor that stays on CPU.
"""

from __future__ import annotations

from typing import Any

import torch


def check_map_location(map_location: Any) -> None:
    """Reject an unsupported ``map_location`` before any data is read (so no error is blamed on the file)."""
    if (
        map_location is None
        or isinstance(map_location, torch.device)
        or (callable(map_location) and not isinstance(map_location, (str, dict)))
    ):
        return
    if isinstance(map_location, str):
        targets = [map_location]
    elif isinstance(map_location, dict):
        targets = list(map_location.values())
    else:
        raise TypeError(
            f"map_location must be None, a str, a torch.device, a dict or a callable, got {type(map_location).__qualname__}"
        )
    for target in targets:
        try:
            torch.device(target)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"map_location {map_location!r}: {target!r} is not a device") from None


def place(t: torch.Tensor, location: str, map_location: Any) -> torch.Tensor:
    """Return CPU tensor ``t`` (saved from ``location``) placed as ``map_location`` says."""
    if map_location is None:
        target: Any = location
    elif isinstance(map_location, (str, torch.device)):
        target = map_location
    elif isinstance(map_location, dict):
        target = map_location.get(location, location)
    elif callable(map_location):
        result = map_location(t.untyped_storage(), location)
        if result is None:  # torch falls back to the saved location
            target = location
        else:
            if isinstance(result, torch.TypedStorage):
                result = result._untyped_storage
            if not isinstance(result, torch.UntypedStorage):
                raise TypeError(
                    f"map_location callable returned {type(result).__qualname__}, expected a storage or None"
                )
            out = torch.empty(0, dtype=torch.uint8, device=result.device).set_(result)
            return (
                out.view(t.dtype).reshape(t.shape)
                if t.numel()
                else torch.empty(t.shape, dtype=t.dtype, device=result.device)
            )
    else:
        raise TypeError(
            f"map_location must be None, a str, a torch.device, a dict or a callable, got {type(map_location).__qualname__}"
        )
    device = torch.device(target)
    return t if device.type == "cpu" else t.to(device)
