"""``ModelParallelStrategy``: Lightning's FSDP2/TP strategy with whole-state ``.sft`` checkpoints.

Lightning's ``ModelParallelStrategy`` never hands a distributed save, nor any load, to the
CheckpointIO plugin: it writes ``torch.distributed.checkpoint`` files plus a pickled ``meta.pt``,
and reads full checkpoints with ``torch.load``. This subclass takes the same arguments and, for
every ``.sft`` path (``.safetensors`` too), routes both through
:class:`~lightning_utils.plugins.SafetensorsCheckpointIO` (or our ``AsyncCheckpointIO`` around it):

* ``save_distributed_checkpoint=True``: a sharded checkpoint directory, every rank writing its
  own blocks in parallel (:mod:`lightning_utils.io.sharded`); ``False``: one consolidated ``.sft``
  written by rank 0, gathered one tensor at a time, keyed like Lightning's own consolidated
  checkpoint (a single-device Trainer resumes it).
* loading a sharded directory or a ``.sft`` file reads into each rank only the slices its
  parameters and optimizer states hold, whatever world size saved it.
* ``.sft`` paths may be fsspec URLs (``s3://bucket/run/step=100.sft``): the ranks upload their
  files and read with ranged reads (see :mod:`lightning_utils.io.sharded`).

Every other path (``.ckpt``, Lightning's DCP directories) is Lightning's own code, unchanged.
``lightning_module_state_dict()`` and ``optimizer_state()`` return the sharded (``DTensor``) state
in both modes, without a host copy; a consolidated ``.ckpt`` is gathered when it is written.

What it must never do: define a file format (``lightning_utils.io.sharded`` does), or pickle.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy as _LightningModelParallelStrategy
from torch.optim import Optimizer
from typing_extensions import override

from lightning_utils._internals import align_compiled_param_names
from lightning_utils.io import storage
from lightning_utils.io.errors import CheckpointFormatError
from lightning_utils.io.sharded import ShardedCheckpoint, checkpoint_root, fill, is_sharded_checkpoint
from lightning_utils.io.state import checkpoint_format, load_state
from lightning_utils.plugins.checkpoint_io import SafetensorsCheckpointIO, ensure_safetensors_checkpoint_io


def _is_safetensors_path(path: str | Path) -> bool:
    try:
        return checkpoint_format(path) == "safetensors"
    except ValueError:
        return False


def _materialized(obj: Any, source: ShardedCheckpoint | None) -> Any:
    """``obj`` with every handle of the lazily loaded ``source`` replaced by its whole tensor."""
    return source.materialize(obj) if source is not None else obj


class ModelParallelStrategy(_LightningModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` that saves and resumes whole-state ``.sft`` checkpoints.

    A drop-in: same arguments, same behaviour for ``.ckpt`` paths. With
    ``Trainer(plugins=[SafetensorsCheckpointIO()])`` (or ``SafetensorsModelCheckpoint``, which
    installs it), ``.sft`` checkpoints are sharded directories (``save_distributed_checkpoint=True``)
    or one consolidated file, and resume on any world size.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._sharded_sft = save_distributed_checkpoint
        self._checkpoint_timeout = timeout
        # A gloo group of its own for checkpoint saves: an asynchronous save runs its collectives on
        # a worker thread while training communicates on the default group.
        self._checkpoint_group: Any = None

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self._checkpoint_group is None:
            self._checkpoint_group = torch.distributed.new_group(backend="gloo", timeout=self._checkpoint_timeout)

    @override
    def teardown(self) -> None:
        # Lightning's ModelParallelStrategy.teardown skips the plugin's teardown, which waits for
        # (and raises the errors of) asynchronous saves.
        try:
            self.checkpoint_io.teardown()
        finally:
            super().teardown()

    # -- what the checkpoint holds -----------------------------------------------------------
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The model's sharded state dict (``DTensor`` values sharing memory with the parameters)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        assert self.model is not None
        return get_model_state_dict(self.model)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer's sharded state, keyed by parameter name (``DTensor`` moments, no copy)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        assert self.model is not None
        return get_optimizer_state_dict(self.model, optimizer)

    # -- saving ----------------------------------------------------------------------------
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        path = storage.path_or_url(self.broadcast(filepath))
        if not _is_safetensors_path(path):
            self._as_lightning_state(checkpoint)
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint of a '.sft' checkpoint takes no storage_options")
        io = self._distributed_checkpoint_io()
        if not self._sharded_sft and "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = [self._keyed_by_index(s) for s in checkpoint["optimizer_states"]]
        io.save_distributed_checkpoint(
            checkpoint, path, consolidated=not self._sharded_sft, group=self._checkpoint_group
        )

    def _distributed_checkpoint_io(self) -> Any:
        """The plugin that writes ``.sft`` checkpoints on every rank (installing ours over Lightning's default)."""
        io = self.checkpoint_io
        if not hasattr(io, "save_distributed_checkpoint"):
            ensure_safetensors_checkpoint_io(self)  # raises for a plugin that cannot write .sft
            io = self.checkpoint_io
        if not hasattr(io, "save_distributed_checkpoint"):
            raise RuntimeError(
                f"the checkpoint plugin {type(io).__qualname__} wraps a SafetensorsCheckpointIO but cannot save "
                "sharded '.sft' checkpoints; use lightning_utils.plugins.AsyncCheckpointIO to save asynchronously"
            )
        return io

    def _as_lightning_state(self, checkpoint: dict[str, Any]) -> None:
        """Put Lightning's own state into ``checkpoint`` for a save that Lightning's code writes."""
        if self._sharded_sft:
            return  # the same DTensors (Lightning's are copied to the CPU first; DCP copies them itself)
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = super().lightning_module_state_dict()
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = [
                super(ModelParallelStrategy, self).optimizer_state(o) for o in self.optimizers
            ]

    def _keyed_by_index(self, state: dict[str, Any]) -> dict[str, Any]:
        """An optimizer state keyed by parameter index, as Lightning's consolidated checkpoints are."""
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        assert self.model is not None
        state = align_compiled_param_names(state, self.model)
        return FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)

    # -- loading ---------------------------------------------------------------------------
    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        # fit(ckpt_path="last") on object storage resolves to the index of a sharded checkpoint
        path = storage.path_or_url(checkpoint_root(self.broadcast(checkpoint_path)))
        if is_sharded_checkpoint(path) or (_is_safetensors_path(path) and storage.is_dir(path)):
            with ShardedCheckpoint(path) as source:  # at a URL: ranged reads of this rank's slices only
                checkpoint = source.load_lazy()
                self._restore(checkpoint, source, path)
                return source.materialize(checkpoint)
        if _is_safetensors_path(path) and storage.is_file(path):
            checkpoint = self._read_file(path)
            self._restore(checkpoint, None, path)
            return checkpoint
        return super().load_checkpoint(path, weights_only=weights_only)

    def _read_file(self, path: str | Path) -> dict[str, Any]:
        """A single-file ``.sft`` through the plugin when it is ours (memory-mapped: nothing is copied yet)."""
        io: Any = self.checkpoint_io
        while not isinstance(io, SafetensorsCheckpointIO) and hasattr(io, "checkpoint_io"):
            io = io.checkpoint_io
        if isinstance(io, SafetensorsCheckpointIO):
            return io.load_checkpoint(path)
        return load_state(path, map_location="cpu")

    def _restore(self, checkpoint: dict[str, Any], source: ShardedCheckpoint | None, path: str | Path) -> None:
        """Load the model and optimizer states of ``checkpoint`` into this rank's shards; drop them from it."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            set_model_state_dict,
        )

        assert self.model is not None
        assert self.lightning_module is not None
        strict = self.lightning_module.strict_loading
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise CheckpointFormatError(path, "not a Lightning checkpoint (no 'state_dict')")
        saved = checkpoint.pop("state_dict")
        target = get_model_state_dict(self.model)
        missing = [k for k in target if k not in saved]
        unexpected = [k for k in saved if k not in target]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"{path}: the checkpoint does not match the model (strict loading): missing keys {missing[:10]}, "
                f"unexpected keys {unexpected[:10]}"
            )
        for key, tensor in target.items():
            if key in saved:
                fill(tensor, saved[key], source, where=f"{path}: state_dict[{key!r}]")
        set_model_state_dict(self.model, target, options=StateDictOptions(strict=False))
        saved_optimizers = checkpoint.pop("optimizer_states", None)
        for i, optimizer in enumerate(self.optimizers):
            if saved_optimizers is None or i >= len(saved_optimizers):
                raise KeyError(
                    f"{path}: the checkpoint has no state for optimizer {i} (saved with weights only?); "
                    "it cannot resume training"
                )
            self._restore_optimizer(optimizer, saved_optimizers[i], source, f"{path}: optimizer_states[{i}]")

    def _restore_optimizer(self, optimizer: Optimizer, saved: dict[str, Any], source: Any, where: str) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        assert self.model is not None
        if saved["state"] and all(isinstance(k, int) for k in saved["state"]):
            # keyed by index (a consolidated checkpoint, as Lightning writes them): back to names
            saved = FullyShardedDataParallel.rekey_optim_state_dict(saved, OptimStateKeyType.PARAM_NAME, self.model)
        target: Any = get_optimizer_state_dict(self.model, optimizer)["state"]  # initialises a fresh optimizer's state
        state: dict[str, Any] = {}
        for name, values in saved["state"].items():
            have = target.get(name, {})
            state[name] = {
                k: self._optimizer_value(have.get(k), v, source, f"{where}['state'][{name!r}][{k!r}]")
                for k, v in values.items()
            }
        set_optimizer_state_dict(
            self.model,
            optimizer,
            # at a URL a tensor in the param groups (a tensor lr) may be a handle still: read it
            optim_state_dict={"state": state, "param_groups": _materialized(saved["param_groups"], source)},
            options=StateDictOptions(strict=self.lightning_module.strict_loading if self.lightning_module else True),
        )

    @staticmethod
    def _optimizer_value(target: Any, saved: Any, source: ShardedCheckpoint | None, where: str) -> Any:
        if not isinstance(saved, torch.Tensor):
            return _materialized(saved, source)  # a list or dict of tensors: any handles in it read whole
        if isinstance(target, torch.Tensor) and tuple(target.shape) == tuple(saved.shape) and target.dim():
            return fill(target, saved, source, where)  # this rank's slice, read into the live state
        name = source.handle_name(saved) if source is not None else None
        return source.read(name) if source is not None and name is not None else saved.clone()
