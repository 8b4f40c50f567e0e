"""What a Hugging Face ``save_pretrained`` directory holds, worked out without the tensors.

An export that ``transformers``' ``from_pretrained(directory)`` loads as it is needs: the
model's ``config.json`` (and ``generation_config.json`` for generative models), the weights
under the names ``save_pretrained`` would use (tied duplicates such as ``lm_head.weight`` left
out, renamed back to the original checkpoint names where the model converts names on load), and
either one ``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` shards with a
``model.safetensors.index.json``. ``save_pretrained`` itself needs every tensor of a shard in
memory at once; this module answers the same questions from names, shapes and dtypes only,
with ``transformers``' and ``huggingface_hub``'s own functions run on ``meta`` tensors, so the
weights can be gathered and written one tensor at a time
(:mod:`lightning_utils.io.gather`, :mod:`lightning_utils.io.weights`).

``transformers`` is an optional dependency (the ``hf`` extra): it is imported only when a
function here is called, and only :func:`pretrained_models` runs without it (finding nothing).
This module never reads or writes tensor data and never imports Lightning.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_utils.io.atomic import atomic_write
from lightning_utils.io.weights import TensorSpec

__all__ = [
    "architecture_name",
    "check_shard_size",
    "hf_weight_names",
    "is_pretrained_model",
    "pretrained_models",
    "shard_layout",
    "write_hf_configs",
    "write_hf_index",
]

log = logging.getLogger(__name__)

_MISSING_EXTRA = "Hugging Face exports need transformers: pip install 'lightning-utils[hf]'"


def _pretrained_class() -> type | None:
    # A PreTrainedModel instance can only exist once transformers was imported: never import it here.
    module = sys.modules.get("transformers.modeling_utils") or sys.modules.get("transformers")
    cls = getattr(module, "PreTrainedModel", None) if module is not None else None
    if cls is None and "transformers" in sys.modules:
        from transformers import PreTrainedModel

        cls = PreTrainedModel
    return cls if isinstance(cls, type) else None


def is_pretrained_model(module: Any) -> bool:
    """Whether ``module`` is a ``transformers`` ``PreTrainedModel`` (also once ``fully_shard`` wrapped it)."""
    cls = _pretrained_class()
    return cls is not None and isinstance(module, cls)


def pretrained_models(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost ``PreTrainedModel`` submodules of ``module`` as ``(name, model)``, in
    registration order (``""`` when ``module`` is one itself); models nested in another are not listed."""
    if is_pretrained_model(module):
        return [("", module)]
    found: list[tuple[str, nn.Module]] = []
    for name, sub in module.named_modules():
        if name and is_pretrained_model(sub) and not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, sub))
    return found


def architecture_name(model: nn.Module) -> str:
    """The model's class name as ``config.architectures`` records it: the class ``fully_shard``
    derives (``FSDPGPT2LMHeadModel``) is skipped for the model class it wraps."""
    try:
        from torch.distributed.fsdp import FSDPModule

        sharded: tuple[type, ...] = (FSDPModule,)
    except ImportError:  # pragma: no cover - torch without distributed
        sharded = ()
    pretrained = _pretrained_class()
    for cls in type(model).__mro__:
        if pretrained is not None and issubclass(cls, pretrained) and not issubclass(cls, sharded):
            return cls.__name__
    return type(model).__name__


def _meta_state(specs: Iterable[TensorSpec]) -> dict[str, torch.Tensor]:
    return {s.name: torch.empty(s.shape, dtype=s.dtype, device="meta") for s in specs}


def _drop_tied(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the tied duplicates ``save_pretrained`` leaves out."""
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        return _drop_tied_fallback(model, state)
    try:
        # With meta tensors transformers finds the ties by parameter identity in the model.
        return remove_tied_weights_from_state_dict(dict(state), model)
    except RuntimeError as err:
        raise ValueError(
            f"transformers refuses to save this {architecture_name(model)} ({err}); "
            "pass ExportWeights(hf_format=False) to export every tensor under its own name"
        ) from None


def _drop_tied_fallback(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For transformers releases without ``remove_tied_weights_from_state_dict``: of the names
    that share one parameter, those the model declares tied (``_tied_weights_keys``, searched as
    patterns as transformers does) are dropped, keeping at least the last of them."""
    import re

    declared: list[str] = []
    for name, sub in model.named_modules():
        tied = getattr(sub, "_tied_weights_keys", None) or ()
        declared.extend(f"{name}.{k}" if name else k for k in tied)
    groups: dict[int, list[str]] = {}
    for key in state:
        try:
            target = model.get_parameter(key)
        except AttributeError:
            try:
                target = model.get_buffer(key)
            except AttributeError:
                continue
        groups.setdefault(id(target), []).append(key)
    dropped: set[str] = set()
    for names in groups.values():
        if len(names) < 2:
            continue
        matching = [n for n in sorted(names) if any(re.search(p, n) for p in declared)]
        dropped.update(matching[: len(names) - 1] if len(matching) == len(names) else matching)
    return {k: v for k, v in state.items() if k not in dropped}


def _revert_names(model: Any, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{model name: checkpoint name}`` for the names ``save_pretrained`` writes back in the
    original checkpoint format; the model's own names where transformers has no such mapping."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {k: k for k in state}
    reverted = revert_weight_conversion(model, dict(state))
    by_id = {id(t): k for k, t in state.items()}
    mapping = {by_id.get(id(t)): out for out, t in reverted.items()}
    if None in mapping or len(mapping) != len(state):
        # The conversion combines or splits tensors (e.g. fused experts): it needs the tensors
        # together, which a one-tensor-at-a-time export never has. transformers loads the
        # model's own names too (what save_pretrained(save_original_format=False) writes).
        log.warning(
            "%s converts its weights between the checkpoint and the model format by combining "
            "tensors; the export keeps the model's own tensor names (as save_pretrained("
            "save_original_format=False) does), which this transformers version loads",
            architecture_name(model),
        )
        return {k: k for k in state}
    return {k: v for k, v in mapping.items() if k is not None}


def hf_weight_names(model: nn.Module, specs: Iterable[TensorSpec]) -> dict[str, str]:
    """``{state-dict name: name in the export}`` for the tensors ``save_pretrained`` would write.

    ``specs`` are the model's state-dict tensors (names relative to ``model``). Keys the model
    asks not to save (``_keys_to_ignore_on_save``) and tied duplicates are left out.
    """
    try:
        import transformers  # noqa: F401
    except ImportError as err:  # pragma: no cover - the extra is installed where it is tested
        raise ImportError(_MISSING_EXTRA) from err
    state = _meta_state(specs)
    for pattern in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(pattern, None)
    kept = _drop_tied(model, state)
    return _revert_names(model, kept)


def shard_layout(
    specs: list[TensorSpec], max_shard_size: int | str | None
) -> tuple[list[tuple[str, list[str]]], dict[str, Any] | None]:
    """The weight files of a ``save_pretrained`` directory: ``[(file name, tensor names)]`` and
    the ``model.safetensors.index.json`` content (``None`` for a single ``model.safetensors``).

    ``max_shard_size`` (bytes, or a string such as ``"5GB"``) is split exactly as
    ``huggingface_hub.split_torch_state_dict_into_shards`` splits it for ``save_pretrained``;
    ``None`` means ``save_pretrained``'s default.
    """
    try:
        from huggingface_hub import split_torch_state_dict_into_shards
        from transformers.utils import SAFE_WEIGHTS_NAME
    except ImportError as err:  # pragma: no cover - the extra is installed where it is tested
        raise ImportError(_MISSING_EXTRA) from err
    if max_shard_size is None:
        import inspect

        from transformers import PreTrainedModel

        max_shard_size = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    pattern = SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    split = split_torch_state_dict_into_shards(
        _meta_state(specs), filename_pattern=pattern, max_shard_size=max_shard_size
    )
    files = [(name, list(tensors)) for name, tensors in split.filename_to_tensors.items()]
    if not split.is_sharded:
        return files, None
    return files, {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}


def check_shard_size(max_shard_size: int | str) -> None:
    """``TypeError``/``ValueError`` naming ``max_shard_size`` when it is not a size that
    ``save_pretrained`` accepts (a positive number of bytes, or a string such as ``"5GB"``)."""
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (int, str)):
        raise TypeError(f"max_shard_size must be a number of bytes or a string such as '5GB', got {max_shard_size!r}")
    if isinstance(max_shard_size, int):
        if max_shard_size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
        return
    try:
        from huggingface_hub import split_torch_state_dict_into_shards
    except ImportError as err:  # pragma: no cover - the extra is installed where it is tested
        raise ImportError(_MISSING_EXTRA) from err
    try:
        split_torch_state_dict_into_shards({}, max_shard_size=max_shard_size)  # parses the size
    except ValueError as err:
        raise ValueError(f"max_shard_size={max_shard_size!r} is not a size such as '5GB' ({err})") from None


def write_hf_configs(model: Any, directory: str | os.PathLike[str], dtype: torch.dtype | None) -> list[str]:
    """Write ``config.json`` (and ``generation_config.json`` for a generative model) into
    ``directory`` as ``save_pretrained`` does: with ``architectures`` and the weights' dtype
    recorded, from copies, so the live model's config is left as it was. Returns the file names."""
    config = copy.deepcopy(model.config)
    config.architectures = [architecture_name(model)]
    if dtype is not None:
        import transformers

        field = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        setattr(config, field, str(dtype).removeprefix("torch."))
    config.save_pretrained(directory)
    written = ["config.json"]
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation is not None and callable(can_generate) and can_generate():
        copy.deepcopy(generation).save_pretrained(directory)
        written.append("generation_config.json")
    return written


def write_hf_index(directory: str | os.PathLike[str], index: Mapping[str, Any]) -> str:
    """Write ``model.safetensors.index.json`` as ``save_pretrained`` formats it; returns its name."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

    with atomic_write(Path(directory) / SAFE_WEIGHTS_INDEX_NAME) as f:
        f.write((json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return SAFE_WEIGHTS_INDEX_NAME
