"""``ExportWeights``: write the model's weights, and only the weights, for use outside training.

Two forms, chosen per model:

* a plain ``.sft`` file: an ordinary safetensors file (a flat ``name -> tensor`` dict plus
  string metadata) that ``safetensors.torch.load_file``, Hugging Face tools and
  ``module.load_state_dict`` read directly;
* a Hugging Face directory, when the exported module is a ``transformers`` ``PreTrainedModel``:
  ``config.json`` and the weights as ``save_pretrained`` writes them, so that
  ``from_pretrained(directory)`` loads the trained model as it is.

Floating tensors are cast to the chosen dtype; the step, epoch, hyperparameters and the latest
scalar metrics go into the safetensors metadata as JSON strings. Under every strategy the
weights are gathered to global rank 0 one tensor at a time (:mod:`lightning_utils.io.gather`)
and written as they arrive (:mod:`lightning_utils.io.weights`), so no rank ever holds more
than one extra tensor.

It exports on train end, when :class:`~lightning_utils.callbacks.TrainingControl` asks
(``export`` command, schedule, quit), and optionally alongside every checkpoint.

This callback must never write pickle files or anything but weights and their configs, never
write from a rank other than global rank 0, never hold the whole model on one rank, and never
leave a partial file or directory under the final name.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_utils.io import hf_export, storage
from lightning_utils.io.gather import MemoryTracker, PlanEntry, RankZeroGather, TensorInfo
from lightning_utils.io.state import RESERVED_METADATA, encode_metadata
from lightning_utils.io.weights import (
    RemoteDirectory,
    TensorSpec,
    file_order,
    staged_directory,
    stream_safetensors,
)

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


def _check_metadata_keys(extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if key in RESERVED_METADATA and not (key == "format" and value == "pt"):
            raise ValueError(
                f"ExportWeights(metadata=...): key {key!r} is reserved ({', '.join(RESERVED_METADATA)}; "
                "'format' may only be 'pt'); rename it"
            )


@dataclass(frozen=True)
class _Target:
    """What an export writes: the keys under ``prefix`` (``None``: every key), and, for a
    Hugging Face directory, the ``PreTrainedModel`` that lives there."""

    prefix: str | None
    hf_model: nn.Module | None = None


@dataclass
class _File:
    name: str
    specs: list[TensorSpec]  # in file order
    metadata: dict[str, str]


@dataclass
class _Layout:
    """What rank 0 writes: one file, or a directory of files plus configs and an index."""

    path: Path | str  # a str for an fsspec URL
    files: list[_File]
    hf_model: nn.Module | None = None
    index: dict[str, Any] | None = None


def _write_small_files(folder: Path | RemoteDirectory, write: Callable[[Path], Any]) -> None:
    """Let ``write(directory)`` write small files (configs, an index) into ``folder``; for a folder
    at a URL they are written to a local temporary directory, then each uploaded whole."""
    if isinstance(folder, Path):
        write(folder)
        return
    with tempfile.TemporaryDirectory() as scratch:
        write(Path(scratch))
        for child in sorted(Path(scratch).iterdir()):
            with storage.atomic_writer(folder / child.name) as f:
                f.write(child.read_bytes())


class _Output:
    """Rank 0's writer for one export: files are opened in turn as the tensors arrive; nothing
    appears under the final name until :meth:`commit` (at a URL: each file appears whole when it
    is complete, and a Hugging Face directory's index is written last, at :meth:`commit`)."""

    def __init__(self, layout: _Layout, dtype: torch.dtype | None) -> None:
        self._layout = layout
        self._stack = contextlib.ExitStack()
        self._file_stack: contextlib.ExitStack | None = None
        self._writer: Any = None
        self._files = iter(layout.files)
        self._folder: Any
        try:
            if layout.hf_model is not None:
                model = layout.hf_model
                self._folder = self._stack.enter_context(staged_directory(layout.path))
                _write_small_files(self._folder, lambda d: hf_export.write_hf_configs(model, d, dtype))
            else:
                self._folder = None  # one file: written straight to layout.path
        except BaseException as error:
            # exit the stage as failed: closing it normally would publish the partial directory
            self._stack.__exit__(type(error), error, error.__traceback__)
            raise

    def _next_file(self) -> None:
        if self._file_stack is not None:
            self._file_stack.close()  # the previous file is complete: rename it into place
        file = next(self._files)
        self._file_stack = contextlib.ExitStack()
        target = self._layout.path if self._folder is None else self._folder / file.name
        self._writer = self._file_stack.enter_context(stream_safetensors(target, file.specs, file.metadata))

    def write(self, entry: PlanEntry, tensor: torch.Tensor) -> None:
        if self._writer is None or self._writer.expected is None:
            self._next_file()
        self._writer.write(entry.out.name, tensor)

    def commit(self) -> None:
        if self._file_stack is not None:
            self._file_stack.close()
        if next(self._files, None) is not None:
            raise RuntimeError("an export file was never written")
        index = self._layout.index
        if index is not None:  # last: at a URL it is what makes the directory a complete export
            _write_small_files(self._folder, lambda d: hf_export.write_hf_index(d, index))
        self._stack.close()

    def abort(self, error: BaseException) -> None:
        for stack in (self._file_stack, self._stack):
            if stack is not None:
                stack.__exit__(type(error), error, error.__traceback__)


def _sharding_strategy(strategy: Any) -> str | None:
    """``"fsdp2"`` for Lightning's ModelParallelStrategy, ``"fsdp"`` for FSDPStrategy, else ``None``."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    return None


class ExportWeights(Callback):
    r"""Export the model weights: a plain safetensors (``.sft``) file, or a Hugging Face directory.

    Args:
        dirpath: folder of the exports. Default: ``<default_root_dir>/export``.
        filename: name template of each export, formatted with ``step`` and ``epoch``. Default
            ``"weights-step={step}"``. A plain export is a file: ``.sft`` is added unless the
            name ends in ``.sft``/``.safetensors``. A Hugging Face export is a directory of
            that name (no suffix allowed).
        dtype: ``"bf16"``, ``"fp16"``, ``"fp32"`` (or a ``torch.dtype``) for floating tensors;
            ``None`` keeps each tensor's dtype. Integer and bool tensors are never cast.
        strip_prefix: export only the keys under this prefix, without it. It names a submodule
            of the LightningModule: ``"model."`` (or ``"model"``) exports ``self.model``, under
            its own names. When that submodule is a ``transformers`` ``PreTrainedModel`` the
            export is a Hugging Face directory (see ``hf_format``). ``None``: the whole
            LightningModule, or the one ``PreTrainedModel`` it holds.
        export_on_train_end: export when ``fit`` ends (normally or by ``quit``).
        export_on_checkpoint: also export whenever the trainer saves a checkpoint
            (``ModelCheckpoint``, ``TrainingControl``, ``trainer.save_checkpoint``).
        metadata: extra metadata (a mapping, or a callable ``(trainer, pl_module) -> mapping``),
            stored as JSON strings next to ``step``, ``epoch``, ``dtype``, ``hparams``, ``metrics``.
        hf_format: ``None`` (default): a Hugging Face directory when the exported module is a
            ``PreTrainedModel`` (``strip_prefix``'s submodule, or, without ``strip_prefix``, the
            only ``PreTrainedModel`` in the LightningModule), a plain file otherwise. ``True``:
            require one (a clear error when there is none). ``False``: always a plain file.
        max_shard_size: Hugging Face directories only: the largest weight file, in bytes or as
            ``"5GB"``; a larger model is split into ``model-0000k-of-0000n.safetensors`` with a
            ``model.safetensors.index.json``, exactly as ``save_pretrained`` splits it. ``None``:
            ``save_pretrained``'s default (50GB).

    A plain file loads with ``safetensors.torch.load_file(path)`` and, for the full model,
    ``pl_module.load_state_dict(load_file(path))`` (tied weights are written under each name).
    A Hugging Face directory holds ``config.json`` (the model's config, with ``architectures``
    and the exported dtype), ``generation_config.json`` for generative models, and the weights
    under the names ``save_pretrained`` uses (tied duplicates such as ``lm_head.weight`` are
    left out, as transformers does): ``AutoModelForCausalLM.from_pretrained(path)`` loads it.
    Nothing is pickled.

    Call :meth:`export` on every rank (the callback's hooks and ``TrainingControl`` do): under
    ``ModelParallelStrategy`` (FSDP2, tensor parallel) and DDP the weights are gathered to global
    rank 0 one tensor at a time, so the extra memory on any rank is at most about one tensor
    (:attr:`last_memory` accounts it), and only rank 0 writes; ``FSDPStrategy``'s sharded state
    goes through the same gather (GPU only, so not run in this project's tests). A failure on any
    rank raises on every rank, and that step may be exported again. DeepSpeed ZeRO stage 3 is
    refused when fit starts.
    :attr:`last_path` is the latest export written.
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
        hf_format: bool | None = None,
        max_shard_size: int | str | None = None,
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
        # a URL (s3://bucket/export) stays a string: Path would turn it into s3:/bucket/export
        self.dirpath: Path | str | None = None if dirpath is None else storage.path_or_url(dirpath)
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
        if hf_format not in (None, True, False):
            raise TypeError(f"hf_format must be None (automatic), True or False, got {hf_format!r}")
        self.hf_format = hf_format
        if max_shard_size is not None:
            if hf_format is False:
                raise ValueError("max_shard_size applies to Hugging Face directories, and hf_format=False was given")
            hf_export.check_shard_size(max_shard_size)
        self.max_shard_size = max_shard_size
        self.last_path: Path | str | None = None
        self.last_memory: MemoryTracker | None = None
        self._last_export_step: int | None = None

    # public API -----------------------------------------------------------------------------
    def export_path(self, trainer: Trainer, pl_module: LightningModule | None = None) -> Path | str:
        """Where an export at the trainer's current step goes: a ``.sft`` file, or the directory
        of a Hugging Face export (a URL string when ``dirpath`` is a URL)."""
        name = self.filename.format(step=trainer.global_step, epoch=trainer.current_epoch)
        module = pl_module if pl_module is not None else getattr(trainer, "lightning_module", None)
        hf = module is not None and self._target(module).hf_model is not None
        if not hf and Path(name).suffix.lower() not in _SUFFIXES:
            name += ".sft"
        folder = self.dirpath if self.dirpath is not None else storage.join(trainer.default_root_dir, "export")
        return storage.path_or_url(storage.join(folder, name))

    def export(
        self, trainer: Trainer, pl_module: LightningModule, state_dict: Mapping[str, Any] | None = None
    ) -> Path | str | None:
        """Export now. Call it on **every** rank (gathering a sharded model is collective);
        only global rank 0 writes. Returns the path on rank 0, ``None`` elsewhere or when the
        weights of this step were already exported.

        ``state_dict`` (a checkpoint's, when exporting alongside it) may hold sharded tensors
        (``DTensor``); without it the model's own state is read, sharded as it is trained.
        """
        step = trainer.global_step
        # The same test on every rank (never "and I wrote a file", which only rank 0 did): a rank
        # that went on would gather the state dict and read the metrics, collectives the ranks
        # that returned here never join.
        if self._last_export_step == step:
            log.debug("weights of step %d already exported to %s", step, self.last_path)
            return self.last_path if trainer.is_global_zero else None
        self._refuse_deepspeed_stage_3(trainer)
        target = self._target(pl_module)
        if state_dict is None:
            state_dict = self._state_dict(trainer, pl_module)
        self._last_export_step = step
        # Read on every rank: Lightning computes callback_metrics on access, and for epoch-level
        # sync_dist metrics that is an all-reduce every rank must join.
        metrics = self._metrics(trainer)
        if not trainer.is_global_zero and not (dist.is_available() and dist.is_initialized()):
            return None  # no process group: nothing to gather, and only rank 0 writes
        try:
            return self._gather_and_write(trainer, pl_module, state_dict, target, metrics)
        except BaseException:
            # Every rank raised alike (the gather makes sure of it), so every rank forgets the
            # step alike: a later export of the same step tries again.
            self._last_export_step = None
            raise

    def _gather_and_write(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        state_dict: Mapping[str, Any],
        target: _Target,
        metrics: dict[str, Any],
    ) -> Path | str | None:
        items = self._items(state_dict, target.prefix)
        tracker = MemoryTracker()
        gather: RankZeroGather[_Layout] = RankZeroGather(items, tracker=tracker)
        entries, layout = gather.plan(lambda available: self._layout(available, target, trainer, pl_module, metrics))
        with gather.outcome() as outcome:
            output: _Output | None = None
            if gather.is_rank_zero:
                assert layout is not None
                with outcome.capture():
                    output = _Output(layout, self.dtype)
            gather.stream(entries, output.write if output is not None else None, outcome)
            if output is not None:
                if outcome.error is None:
                    with outcome.capture():
                        output.commit()
                if outcome.error is not None:
                    output.abort(outcome.error)
        self.last_memory = tracker
        if not gather.is_rank_zero:
            return None
        assert layout is not None
        self.last_path = layout.path
        log.info("exported %d tensors (%s) to %s", len(entries), self._dtype_name, layout.path)
        return layout.path

    # hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._last_export_step = None  # a new fit may reach the same step numbers again

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The model is built (configure_model ran): settle now, before the first step, what the
        # exports will be, so that a bad setting fails here rather than at the end of the run.
        self._refuse_deepspeed_stage_3(trainer)
        self._target(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.export_on_train_end:
            self.export(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.export_on_checkpoint and "state_dict" in checkpoint:
            # The checkpoint already holds the model state (sharded or gathered): no second read.
            self.export(trainer, pl_module, state_dict=checkpoint["state_dict"])

    # internals --------------------------------------------------------------------------------
    @property
    def _dtype_name(self) -> str:
        return "original dtypes" if self.dtype is None else str(self.dtype).removeprefix("torch.")

    def _target(self, pl_module: nn.Module) -> _Target:
        """Which keys to export, and whether as a Hugging Face directory (the same on every rank)."""
        prefix = self.strip_prefix
        hf_model: nn.Module | None = None
        if self.hf_format is not False:
            if prefix is not None:
                try:
                    module = pl_module.get_submodule(prefix[:-1])
                except AttributeError:
                    module = None
                if hf_export.is_pretrained_model(module):
                    hf_model = module
                elif self.hf_format:
                    what = "no submodule" if module is None else f"a {type(module).__name__}"
                    raise ValueError(
                        f"ExportWeights(hf_format=True, strip_prefix={prefix!r}): the LightningModule has {what} "
                        "there, not a transformers PreTrainedModel"
                    )
            else:
                found = hf_export.pretrained_models(pl_module)
                if len(found) > 1:
                    names = ", ".join(repr(name) for name, _ in found)
                    raise ValueError(
                        f"ExportWeights: the LightningModule holds several transformers models ({names}); name the one "
                        f"to export with strip_prefix='{found[0][0]}.', or pass hf_format=False to export everything "
                        "as one plain .sft file"
                    )
                if found:
                    name, hf_model = found[0]
                    prefix = f"{name}." if name else None
                elif self.hf_format:
                    raise ValueError(
                        "ExportWeights(hf_format=True): the LightningModule holds no transformers PreTrainedModel"
                    )
        if hf_model is not None and Path(self.filename).suffix.lower() in _SUFFIXES:
            raise ValueError(
                f"ExportWeights(filename={self.filename!r}): a Hugging Face export is a directory; drop the "
                "suffix, or pass hf_format=False for a single .sft file"
            )
        if hf_model is None and self.max_shard_size is not None:
            raise ValueError(
                f"ExportWeights(max_shard_size={self.max_shard_size!r}) applies to Hugging Face directories, but "
                "this export is a single .sft file (the exported module is not a transformers PreTrainedModel)"
            )
        return _Target(prefix, hf_model)

    @staticmethod
    def _refuse_deepspeed_stage_3(trainer: Trainer) -> None:
        if getattr(trainer.strategy, "zero_stage_3", False):
            raise ValueError(
                "ExportWeights does not gather DeepSpeed ZeRO stage 3 partitions (its state dict would hold "
                "empty tensors); export from a checkpoint with DeepSpeed's zero_to_fp32, or train with "
                "ModelParallelStrategy (FSDP2), FSDPStrategy or ZeRO stage 1/2"
            )

    @staticmethod
    def _state_dict(trainer: Trainer, pl_module: LightningModule) -> Mapping[str, Any]:
        """The model state as the ranks hold it. For the sharding strategies this is the sharded
        state dict, read without gathering or copying (Lightning's ``lightning_module_state_dict``
        would gather the full model on rank 0 under ``FSDPStrategy``'s default and copy every
        shard to the CPU under ``ModelParallelStrategy``); the gather below assembles it one
        tensor at a time. Other strategies give their usual state dict."""
        strategy = trainer.strategy
        kind = _sharding_strategy(strategy)
        if kind is None:
            return strategy.lightning_module_state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # FSDPStrategy wraps the LightningModule itself, so its state dict comes from the wrapper;
        # fully_shard (FSDP2) changes the modules in place.
        module = strategy.model if kind == "fsdp" and strategy.model is not None else pl_module
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=False, cpu_offload=False))

    @staticmethod
    def _items(state_dict: Mapping[str, Any], prefix: str | None) -> list[tuple[str, Any]]:
        items = []
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                continue
            if prefix:
                if not key.startswith(prefix):
                    continue
                key = key[len(prefix) :]
            items.append((key, value))
        return items

    def _export_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None and dtype.is_floating_point else dtype

    def _layout(
        self,
        available: dict[str, TensorInfo],
        target: _Target,
        trainer: Trainer,
        pl_module: LightningModule,
        metrics: dict[str, Any],
    ) -> tuple[list[tuple[str, TensorSpec]], _Layout]:
        """Rank 0: which tensors go into which file, in the order they are gathered."""
        if not available:
            where = f" under prefix {target.prefix!r}" if target.prefix else ""
            raise ValueError(f"ExportWeights: the model state has no tensors{where} to export")
        meta = encode_metadata(self._metadata(trainer, pl_module, metrics))  # bad user metadata fails first
        path = self.export_path(trainer, pl_module)
        specs = {name: TensorSpec(name, self._export_dtype(info.dtype), info.shape) for name, info in available.items()}
        if target.hf_model is None:
            ordered = file_order(list(specs.values()))
            layout = _Layout(path, [_File(os.path.basename(os.fspath(path)), ordered, meta)])
            return [(s.name, s) for s in ordered], layout
        names = hf_export.hf_weight_names(target.hf_model, specs.values())
        out = {src: TensorSpec(dst, specs[src].dtype, specs[src].shape) for src, dst in names.items()}
        by_out = {spec.name: (src, spec) for src, spec in out.items()}
        files, index = hf_export.shard_layout(list(out.values()), self.max_shard_size)
        count = getattr(target.hf_model, "num_parameters", None)
        if index is not None and callable(count):  # what save_pretrained records next to total_size
            index["metadata"] = {"total_parameters": count(), **index["metadata"]}
        chosen: list[tuple[str, TensorSpec]] = []
        layout_files = []
        for file_name, tensor_names in files:
            ordered = file_order([by_out[n][1] for n in tensor_names])
            chosen.extend((by_out[spec.name][0], spec) for spec in ordered)
            layout_files.append(_File(file_name, ordered, meta))
        left_out = len(available) - len(chosen)
        if left_out:
            log.info("Hugging Face export: %d tensor name(s) left out (tied duplicates, keys not saved)", left_out)
        return chosen, _Layout(path, layout_files, target.hf_model, index)

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
        # Strings are stored as they are and the rest JSON-encoded, those keys listed in the
        # file, so lightning_utils.io.load_state gives back exactly these values (a string "123"
        # stays a string) while plain safetensors readers see JSON strings.
        return meta
