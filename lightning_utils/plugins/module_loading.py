"""Loading a ``LightningModule`` from a ``.sft`` checkpoint, and refusing strategies that bypass IO.

``LightningModule.load_from_checkpoint`` calls ``torch.load`` directly and never sees a
``CheckpointIO`` plugin, so it cannot read ``.sft`` files. :func:`load_from_checkpoint` does the
same job for every suffix: it reads the file with :func:`~lightning_utils.io.load_state`, runs
Lightning's checkpoint migration, and hands the dict to Lightning's own module-restoring code, so
hparams, ``on_load_checkpoint`` and ``strict`` behave exactly as in Lightning.

FSDP (sharded) and DeepSpeed strategies write their own checkpoint formats without calling the
plugin; :func:`check_strategy_writes_through_checkpoint_io` turns a silent ``.ckpt`` where the
user asked for ``.sft`` into a clear error.

This module never reads a file itself (:mod:`lightning_utils.io` does) and never unpickles a
``.sft``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from lightning_utils._internals import fsdp_state_dict_type, load_module_state
from lightning_utils.io.state import checkpoint_format, load_state

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

M = TypeVar("M", bound="LightningModule")
_VERSION_KEY = "pytorch-lightning_version"


def load_from_checkpoint(
    cls: type[M],
    path: str | os.PathLike,
    map_location: Any = None,
    hparams_file: str | os.PathLike | None = None,
    strict: bool | None = None,
    weights_only: bool | None = None,
    **kwargs: Any,
) -> M:
    """``cls.load_from_checkpoint(path, ...)`` that also reads ``.sft`` checkpoints.

    The same steps as Lightning's: ``hparams_file`` (``.yaml``/``.csv``) replaces the saved
    hyperparameters, ``kwargs`` override them (and ``on_load_checkpoint`` sees the merged
    values), the state dict is loaded with ``strict``, and the module ends up on the device of
    the loaded weights (``map_location`` decides that; CPU by default).
    """
    from lightning.pytorch.core.saving import load_hparams_from_tags_csv, load_hparams_from_yaml
    from lightning.pytorch.utilities import rank_zero_info
    from lightning.pytorch.utilities.migration import migrate_checkpoint, pl_legacy_patch

    checkpoint = load_state(
        path, map_location=map_location if map_location is not None else "cpu", weights_only=weights_only
    )
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{os.fspath(path)}: not a Lightning checkpoint (no 'state_dict' key)")
    with pl_legacy_patch():
        saved_version = checkpoint.get(_VERSION_KEY)
        checkpoint, migrations = migrate_checkpoint(checkpoint)
    if migrations:
        rank_zero_info(
            f"Lightning upgraded the checkpoint {os.fspath(path)} from v{saved_version} to "
            f"v{checkpoint[_VERSION_KEY]} in memory; save it again to keep the upgrade"
        )
    key = cls.CHECKPOINT_HYPER_PARAMS_KEY
    if hparams_file is not None:
        suffix = os.fspath(hparams_file).rsplit(".", 1)[-1].lower()
        if suffix == "csv":
            checkpoint[key] = load_hparams_from_tags_csv(os.fspath(hparams_file))
        elif suffix in ("yml", "yaml"):
            checkpoint[key] = load_hparams_from_yaml(os.fspath(hparams_file))
        else:
            raise ValueError(f"hparams_file={os.fspath(hparams_file)!r}: expected a .csv, .yml or .yaml file")
    checkpoint.setdefault(key, {})
    checkpoint[key].update(kwargs)
    model = load_module_state(cls, checkpoint, strict=strict, **kwargs)
    device = next((t.device for t in checkpoint["state_dict"].values() if isinstance(t, torch.Tensor)), None)
    if device is not None:
        model = model.to(device)
    return model


def check_strategy_writes_through_checkpoint_io(strategy: Any, path_or_suffix: str) -> None:
    """Raise if ``strategy`` would not write ``path_or_suffix`` through the CheckpointIO plugin.

    Only safetensors targets are checked: a ``.ckpt`` under DeepSpeed is what the user gets
    from Lightning anyway.
    """
    suffix = (
        path_or_suffix
        if path_or_suffix.startswith(".") and os.sep not in path_or_suffix
        else os.path.splitext(path_or_suffix)[1]
    )
    try:
        if checkpoint_format("x" + suffix) != "safetensors":
            return
    except ValueError:
        return
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    name = type(strategy).__name__
    bypass = None
    if isinstance(strategy, DeepSpeedStrategy):
        bypass = "DeepSpeed writes its own checkpoint directories"
    elif isinstance(strategy, FSDPStrategy):
        kind = fsdp_state_dict_type(strategy)
        bypass = f"FSDP (state_dict_type={kind!r}) loads checkpoints with torch directly" + (
            " and saves sharded ones without the plugin" if kind == "sharded" else ""
        )
    elif isinstance(strategy, ModelParallelStrategy):
        bypass = "ModelParallelStrategy loads checkpoints with torch directly"
    if bypass:
        raise RuntimeError(
            f"{name} bypasses the CheckpointIO plugin ({bypass}), so it cannot write or resume "
            f"'{suffix}' checkpoints; use '.ckpt' with this strategy"
        )
