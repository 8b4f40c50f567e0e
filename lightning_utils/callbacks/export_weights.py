"""``ExportWeights``: write the model's weights, and only the weights, as a plain ``.sft`` file.

The file is an ordinary safetensors file (a flat ``name -> tensor`` dict plus string
metadata) that ``safetensors.torch.load_file``, Hugging Face tools and
``module.load_state_dict`` read directly: no optimizer, no pickle, no Lightning. Floating
tensors are cast to the chosen dtype; the step, epoch, hyperparameters and the latest scalar
metrics go into the metadata as JSON strings.

It exports on train end, when :class:`~lightning_utils.callbacks.TrainingControl` asks
(``export`` command, schedule, quit), and optionally alongside every checkpoint.

This callback must never write anything but a ``.sft`` weights file, never write from a rank
other than global rank 0, and never leave a partial file under the final name.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from lightning_utils.io.state import JSON_KEYS_KEY, SKELETON_KEY

__all__ = ["ExportWeights"]

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
}
_SUFFIXES = (".sft", ".safetensors")


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(set(_DTYPES))} (or None to keep each tensor's)")
    return _DTYPES[key]


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy of hparams/metrics; what JSON cannot hold becomes its ``str``."""
    if isinstance(value, torch.Tensor):
        return _jsonable(value.item()) if value.numel() == 1 else str(value)
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return _jsonable(value.item())
        except Exception:  # noqa: BLE001 - hparams hold arbitrary objects; one whose item() fails is written as its str
            return str(value)
    return str(value)


# Metadata keys lightning_utils.io.save_weights keeps for itself ("format" may only be "pt").
_RESERVED_METADATA = ("format", "module", SKELETON_KEY, JSON_KEYS_KEY)


def _check_metadata_keys(extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if key in _RESERVED_METADATA and not (key == "format" and value == "pt"):
            raise ValueError(
                f"ExportWeights(metadata=...): key {key!r} is reserved ({', '.join(_RESERVED_METADATA)}; "
                "'format' may only be 'pt'); rename it"
            )


class ExportWeights(Callback):
    r"""Export the model weights as a plain safetensors (``.sft``) file.

    Args:
        dirpath: folder of the exported files. Default: ``<default_root_dir>/export``.
        filename: file name template, formatted with ``step`` and ``epoch``; ``.sft`` is added
            unless it ends in ``.sft``/``.safetensors``. Default ``"weights-step={step}"``.
        dtype: ``"bf16"``, ``"fp16"``, ``"fp32"`` (or a ``torch.dtype``) for floating tensors;
            ``None`` keeps each tensor's dtype. Integer and bool tensors are never cast.
        strip_prefix: export only the keys under this prefix, without it (e.g. ``"model."`` to
            export the inner ``nn.Module`` that your LightningModule holds as ``self.model``;
            ``"model"`` means the same).
        export_on_train_end: export when ``fit`` ends (normally or by ``quit``).
        export_on_checkpoint: also export whenever the trainer saves a checkpoint
            (``ModelCheckpoint``, ``TrainingControl``, ``trainer.save_checkpoint``).
        metadata: extra metadata (a mapping, or a callable ``(trainer, pl_module) -> mapping``),
            stored as JSON strings next to ``step``, ``epoch``, ``dtype``, ``hparams``, ``metrics``.

    The file loads with ``safetensors.torch.load_file(path)`` and, for the full model,
    ``pl_module.load_state_dict(load_file(path))`` (tied weights are written once per name).
    :attr:`last_path` is the latest file written.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str = "weights-step={step}",
        dtype: str | torch.dtype | None = "fp32",
        strip_prefix: str | None = None,
        export_on_train_end: bool = True,
        export_on_checkpoint: bool = False,
        metadata: Mapping[str, Any] | Callable[[Trainer, LightningModule], Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.dtype = _resolve_dtype(dtype)
        if not isinstance(filename, str) or not filename.strip():
            raise ValueError(f"filename must be a non-empty template string, got {filename!r}")
        suffix = Path(filename).suffix.lower()
        if suffix and suffix not in _SUFFIXES and "{" not in suffix:
            raise ValueError(
                f"filename {filename!r}: ExportWeights writes safetensors only; use a '.sft' name (or no suffix)"
            )
        try:
            filename.format(step=0, epoch=0)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"filename {filename!r}: only {{step}} and {{epoch}} can be filled in ({err})") from None
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.filename = filename
        if strip_prefix is not None and not isinstance(strip_prefix, str):
            raise TypeError(f"strip_prefix must be a module name such as 'model.', got {type(strip_prefix).__name__}")
        # A prefix names a submodule: "model" is "model.", so "model_ema.*" is not taken and no
        # key comes out starting with ".".
        if strip_prefix and not strip_prefix.endswith("."):
            strip_prefix += "."
        self.strip_prefix = strip_prefix or None
        self.export_on_train_end = export_on_train_end
        self.export_on_checkpoint = export_on_checkpoint
        if metadata is not None and not callable(metadata):
            if not isinstance(metadata, Mapping):
                raise TypeError(
                    "metadata must be a mapping or a callable (trainer, pl_module) -> mapping, "
                    f"got {type(metadata).__name__}"
                )
            _check_metadata_keys(metadata)
        self.metadata = metadata
        self.last_path: Path | None = None
        self._last_export_step: int | None = None
        self._in_checkpoint_export = False

    # public API -----------------------------------------------------------------------------
    def export_path(self, trainer: Trainer) -> Path:
        """Where an export at the trainer's current step goes."""
        name = self.filename.format(step=trainer.global_step, epoch=trainer.current_epoch)
        if Path(name).suffix.lower() not in _SUFFIXES:
            name += ".sft"
        folder = self.dirpath if self.dirpath is not None else Path(trainer.default_root_dir) / "export"
        return folder / name

    def export(
        self, trainer: Trainer, pl_module: LightningModule, state_dict: Mapping[str, Any] | None = None
    ) -> Path | None:
        """Export now. Call it on **every** rank (gathering a sharded model is collective);
        only global rank 0 writes. Returns the path on rank 0, ``None`` elsewhere or when the
        weights of this step were already exported."""
        step = trainer.global_step
        # The same test on every rank (never "and I wrote a file", which only rank 0 did): a rank
        # that went on would gather the state dict and read the metrics, collectives the ranks
        # that returned here never join.
        if self._last_export_step == step:
            log.debug("weights of step %d already exported to %s", step, self.last_path)
            return self.last_path if trainer.is_global_zero else None
        if state_dict is None:
            state_dict = trainer.strategy.lightning_module_state_dict()
        self._last_export_step = step
        # Read on every rank: Lightning computes callback_metrics on access, and for epoch-level
        # sync_dist metrics that is an all-reduce every rank must join.
        metrics = self._metrics(trainer)
        if not trainer.is_global_zero:
            return None
        tensors = self._prepare(state_dict)
        meta = self._metadata(trainer, pl_module, metrics)  # bad user metadata fails before any write
        path = self.export_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        from lightning_utils.io import save_weights

        save_weights(tensors, path, meta)
        self.last_path = path
        log.info("exported %d tensors (%s) to %s", len(tensors), self._dtype_name, path)
        return path

    # hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._last_export_step = None  # a new fit may reach the same step numbers again

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.export_on_train_end:
            self.export(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.export_on_checkpoint and "state_dict" in checkpoint:
            # The checkpoint already holds the gathered model state: no second gather.
            self.export(trainer, pl_module, state_dict=checkpoint["state_dict"])

    # internals --------------------------------------------------------------------------------
    @property
    def _dtype_name(self) -> str:
        return "original dtypes" if self.dtype is None else str(self.dtype).removeprefix("torch.")

    def _prepare(self, state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        seen_storage: set[tuple[int, int]] = set()
        prefix = self.strip_prefix
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                continue
            if prefix:
                if not key.startswith(prefix):
                    continue
                key = key[len(prefix) :]
            t = value.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
                t = t.to(self.dtype)
            # safetensors refuses tensors sharing memory (tied weights, views): give each name its
            # own contiguous copy when its storage was already used by an earlier name.
            storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if storage in seen_storage or not t.is_contiguous() or t.data_ptr() != storage[0]:
                t = t.contiguous().clone()
                storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            seen_storage.add(storage)
            tensors[key] = t
        if not tensors:
            where = f" under prefix {prefix!r}" if prefix else ""
            raise ValueError(f"ExportWeights: the model state has no tensors{where} to export")
        return tensors

    @staticmethod
    def _metrics(trainer: Trainer) -> dict[str, Any]:
        return {
            key: _jsonable(value)
            for key, value in trainer.callback_metrics.items()
            if isinstance(value, torch.Tensor) and value.numel() == 1
        }

    def _metadata(self, trainer: Trainer, pl_module: LightningModule, metrics: dict[str, Any]) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "format": "pt",  # what HF's safetensors loaders look for
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "dtype": self._dtype_name,
            "hparams": _jsonable(dict(pl_module.hparams)),
            "metrics": metrics,
        }
        extra = self.metadata(trainer, pl_module) if callable(self.metadata) else self.metadata
        if extra:
            if not isinstance(extra, Mapping):
                raise TypeError(f"ExportWeights(metadata=...) returned {type(extra).__name__}, not a mapping")
            _check_metadata_keys(extra)
            meta.update(_jsonable(dict(extra)))
        # save_weights stores strings as they are and JSON-encodes the rest, listing those keys in
        # the file, so lightning_utils.io.load_state gives back exactly these values (a string
        # "123" stays a string) while plain safetensors readers see JSON strings.
        return meta
