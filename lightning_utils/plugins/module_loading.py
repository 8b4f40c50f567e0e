"""Loading a ``LightningModule`` from a ``.sft`` checkpoint, and refusing strategies that bypass IO.

``LightningModule.load_from_checkpoint`` calls ``torch.load`` directly and never sees a
``CheckpointIO`` plugin, so it cannot read ``.sft`` files (torch's ``UnpicklingError``; nothing
outside the module class can intercept that call). Two routes that can:

- :class:`SafetensorsLoadMixin`: ``class MyModule(SafetensorsLoadMixin, pl.LightningModule)``, and
  ``MyModule.load_from_checkpoint("x.sft", ...)`` works with every argument of Lightning's; other
  paths and file objects still take Lightning's own route, unchanged.
- :func:`load_from_checkpoint`: ``load_from_checkpoint(MyModule, path, ...)`` for any module class
  and any suffix. It reads the file with :func:`~lightning_utils.io.load_state`, runs Lightning's
  checkpoint migration, and hands the dict to Lightning's own module-restoring code, so hparams,
  ``on_load_checkpoint`` and ``strict`` behave exactly as in Lightning.

FSDP (sharded) and DeepSpeed strategies write their own checkpoint formats without calling the
plugin; :func:`check_strategy_writes_through_checkpoint_io` turns a silent ``.ckpt`` where the
user asked for ``.sft`` into a clear error.

This module never reads a file itself (:mod:`lightning_utils.io` does) and never unpickles a
``.sft``.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import torch

from lightning_utils._internals import fsdp_state_dict_type, load_module_state
from lightning_utils.io.state import SAFETENSORS_SUFFIXES, checkpoint_format, load_state

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule, LightningModule
    from typing_extensions import Self

M = TypeVar("M", "LightningModule", "LightningDataModule")
_VERSION_KEY = "pytorch-lightning_version"


def _device_available(device_type: str) -> bool:
    if device_type == "mps":
        return bool(torch.backends.mps.is_available())
    is_available = getattr(getattr(torch, device_type, None), "is_available", None)
    return bool(is_available()) if callable(is_available) else False


def saved_device_if_available(storage: Any, location: str) -> Any:
    """Lightning's default ``map_location``: a storage goes back to the device it was saved from
    (``None``: torch's default) unless no such device is available here, then it stays on the CPU."""
    device_type = location.split(":", 1)[0]
    if device_type == "cpu" or _device_available(device_type):
        return None
    return storage


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
    the loaded weights. ``map_location`` decides that; by default, as in Lightning, each tensor
    goes back to the device it was saved from when that device is available, else to the CPU.
    ``cls`` may be a ``LightningDataModule`` too (its hparams and ``state_dict`` are restored).
    """
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.core.saving import load_hparams_from_tags_csv, load_hparams_from_yaml
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
    from lightning.pytorch.utilities.migration import migrate_checkpoint, pl_legacy_patch

    checkpoint = load_state(
        path,
        map_location=map_location if map_location is not None else saved_device_if_available,
        weights_only=weights_only,
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
    if issubclass(cls, LightningDataModule):
        return load_module_state(cls, checkpoint, strict=None, **kwargs)
    model = load_module_state(cls, checkpoint, strict=strict, **kwargs)
    if not checkpoint["state_dict"]:
        rank_zero_warn(f"The state dict in {os.fspath(path)!r} contains no parameters.")
        return model
    device = next((t.device for t in checkpoint["state_dict"].values() if isinstance(t, torch.Tensor)), None)
    return model.to(device if device is not None else torch.device("cpu"))


def _names_safetensors_file(checkpoint_path: Any) -> bool:
    return (
        isinstance(checkpoint_path, (str, os.PathLike)) and Path(checkpoint_path).suffix.lower() in SAFETENSORS_SUFFIXES
    )


class _ClassOnlyMethod:
    """A classmethod that refuses to run when called through an instance, as Lightning's
    ``load_from_checkpoint`` does (``model.load_from_checkpoint(p)`` would leave ``model`` as it was)."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self.method = method
        functools.update_wrapper(self, method)  # type: ignore[arg-type]

    def __get__(self, instance: Any, owner: type | None = None) -> Callable[..., Any]:
        cls = owner if owner is not None else type(instance)
        if instance is None:
            return types.MethodType(self.method, cls)

        @functools.wraps(self.method)
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise TypeError(
                f"The classmethod `{cls.__name__}.{self.method.__name__}` cannot be called on an instance. "
                "Call it on the class and use the model it returns."
            )

        return refuse


if TYPE_CHECKING:
    _class_only = classmethod
else:
    _class_only = _ClassOnlyMethod


class SafetensorsLoadMixin:
    """Makes ``MyModule.load_from_checkpoint`` read ``.sft`` checkpoints too.

    List it before ``LightningModule`` (or ``LightningDataModule``) in the base classes::

        class MyModule(SafetensorsLoadMixin, pl.LightningModule): ...

        model = MyModule.load_from_checkpoint("ckpts/last.sft", map_location="cpu", lr=1e-4)

    A path with a safetensors suffix (``.sft``, ``.safetensors``, ``.safetensor``) is read by
    :func:`load_from_checkpoint`, which takes every argument Lightning's method takes
    (``map_location``, ``hparams_file``, ``strict``, ``weights_only``, keyword overrides of the
    saved hyperparameters) with Lightning's meaning; any other path, and a file object, goes to
    Lightning's own ``load_from_checkpoint`` unchanged. Listed after ``LightningModule``, the mixin
    would be silently shadowed, so that is a ``TypeError`` when the class is defined.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        owner = next((c for c in cls.__mro__ if "load_from_checkpoint" in vars(c)), None)
        if owner is not None and not issubclass(owner, SafetensorsLoadMixin):
            raise TypeError(
                f"{cls.__qualname__}: list SafetensorsLoadMixin before {owner.__qualname__} in its base classes "
                f"(class {cls.__name__}(SafetensorsLoadMixin, {owner.__name__})), otherwise "
                f"{owner.__qualname__}.load_from_checkpoint is used and cannot read .sft files"
            )

    @_class_only
    def load_from_checkpoint(
        cls,  # noqa: N805 - a classmethod (see _ClassOnlyMethod)
        checkpoint_path: str | os.PathLike | IO[bytes],
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Self:
        """Lightning's ``load_from_checkpoint``, reading ``.sft`` files through :func:`load_from_checkpoint`."""
        if _names_safetensors_file(checkpoint_path):
            assert isinstance(checkpoint_path, (str, os.PathLike))
            return load_from_checkpoint(  # type: ignore[type-var]
                cls, checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs
            )
        lightning_load: Any = super().load_from_checkpoint  # type: ignore[misc]
        if strict is not None:  # LightningDataModule's takes no strict: passed on only when given
            kwargs["strict"] = strict
        return lightning_load(
            checkpoint_path, map_location=map_location, hparams_file=hparams_file, weights_only=weights_only, **kwargs
        )


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

    from lightning_utils.strategies import ModelParallelStrategy as ShardedSftModelParallelStrategy

    if isinstance(strategy, ShardedSftModelParallelStrategy):
        return  # saves and loads every .sft checkpoint through the plugin, sharded or consolidated
    if isinstance(strategy, ModelParallelStrategy):
        raise RuntimeError(
            "Lightning's ModelParallelStrategy saves sharded checkpoints with torch.distributed.checkpoint and a "
            "pickled meta.pt and loads every checkpoint with torch.load, never through the CheckpointIO plugin, so "
            f"it cannot write or resume '{suffix}' checkpoints. Use "
            "lightning_utils.strategies.ModelParallelStrategy instead: a drop-in with the same arguments that saves "
            "and resumes sharded .sft checkpoints"
        )
    name = type(strategy).__name__
    bypass = None
    if isinstance(strategy, DeepSpeedStrategy):
        bypass = "DeepSpeed writes its own checkpoint directories"
    elif isinstance(strategy, FSDPStrategy):
        kind = fsdp_state_dict_type(strategy)
        bypass = f"FSDP (state_dict_type={kind!r}) loads checkpoints with torch directly" + (
            " and saves sharded ones without the plugin" if kind == "sharded" else ""
        )
    if bypass:
        raise RuntimeError(
            f"{name} bypasses the CheckpointIO plugin ({bypass}), so it cannot write or resume "
            f"'{suffix}' checkpoints; use '.ckpt' with this strategy"
        )
