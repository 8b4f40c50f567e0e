"""Every private Lightning and torch name this package relies on, in one place, each with a reason.

What it is for: a private name (``_FitLoop``, ``trainer._logger_connector``, ``GradScaler._scale``)
can change in any release of Lightning or torch without notice. Each one the package uses is
listed in :data:`PRIVATE_NAMES` with what uses it, why no public API does the job, and which
public alternative was checked. The code that touches a Lightning-private name lives here too,
as a small named function, so that a Lightning upgrade is checked in this one file;
``tests/test_internals.py`` fails with a clear message when a listed name disappears from the
installed Lightning or torch.

What it must never do: import ``lightning`` at import time (the torch-only layer imports this
module); every Lightning access goes through ``sys.modules`` or a lazy import inside a function.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

__all__ = ["PRIVATE_NAMES", "PrivateName", "missing_private_names"]


@dataclass(frozen=True)
class PrivateName:
    """One private name the package uses.

    ``module`` and ``attribute`` locate it: ``attribute`` is a dotted path from the module
    (``"_FitLoop"``, ``"GradScaler._scale"``). A name that exists only on instances (set in
    ``__init__``) is written ``"Class.<instance>.name"`` and is checked by reading the class's
    source. ``used_by`` names our module, ``why`` says what it is needed for, and ``public`` which
    public API was checked and why it does not do the job.
    """

    module: str
    attribute: str
    used_by: str
    why: str
    public: str


# -- data: ResumableDataLoader finding the Lightning loop and fetcher that iterate it ------------
_LOADER = "lightning_utils.data.loader"
_NO_HANDLE = (
    "Lightning gives a loader no handle on the loop or fetcher iterating it: Trainer's public "
    "properties (fit_loop, train_dataloader) and the callback hooks name neither the fetcher nor "
    "which loop is asking, and a callback would have to be added by every user"
)
_DATA: tuple[PrivateName, ...] = (
    PrivateName(
        "lightning.pytorch.loops.fetchers",
        "_DataFetcher",
        _LOADER,
        "recognise Lightning's data fetcher among the callers of iter(loader): it sits between the "
        "loop and the loader, and a loop found without it means Lightning's internals changed",
        _NO_HANDLE,
    ),
    PrivateName(
        "lightning.pytorch.loops.fetchers",
        "_PrefetchDataFetcher",
        _LOADER,
        "the fetcher that holds batches drawn from the loader but not yet handed to the loop; the "
        "saved position must leave them out",
        _NO_HANDLE,
    ),
    PrivateName(
        "lightning.pytorch.loops.fetchers",
        "_PrefetchDataFetcher.<instance>.batches",
        _LOADER,
        "the batches the fetcher holds (drawn from the loader, never trained on yet)",
        "the loop's public batch_progress counts the loop's combined batches, not this loader's "
        "(CombinedLoader restarts a short loader within an epoch), and counts no prefetched batch",
    ),
    PrivateName(
        "lightning.pytorch.loops.fetchers",
        "_PrefetchDataFetcher.<instance>.prefetch_batches",
        _LOADER,
        "whether the fetcher will store the batch the loader is returning (a loader without a "
        "length is prefetched) instead of handing it to the loop",
        "no public API exposes it: the loop picks its fetcher and the prefetch depth",
    ),
    PrivateName(
        "lightning.pytorch.loops.fetchers",
        "_DataFetcher.<instance>.length",
        _LOADER,
        "None when the fetcher cannot size the loader: only then does it prefetch",
        "len(loader) is not what the fetcher decided (CombinedLoader sizes the combination)",
    ),
    PrivateName(
        "lightning.pytorch.loops.fetchers",
        "_DataFetcher.<instance>.iterator",
        _LOADER,
        "None once the fetcher is torn down (fit returned) and its buffer dropped: the loader then "
        "uses the count of held batches it recorded while running",
        "the on_fit_end / teardown hooks would need a callback added by every user",
    ),
    PrivateName(
        "lightning.pytorch.loops.evaluation_loop",
        "_EvaluationLoop",
        _LOADER,
        "an evaluation run (validation, sanity check, test) asked for the iterator: it starts at "
        "the beginning of the epoch and leaves the training position alone",
        _NO_HANDLE + "; trainer.state.stage says what the trainer does, not which loop asks (a "
        "loader used for training and validation is asked by both during fit)",
    ),
    PrivateName(
        "lightning.pytorch.loops.prediction_loop",
        "_PredictionLoop",
        _LOADER,
        "a predict run asked for the iterator: treated like an evaluation run",
        _NO_HANDLE,
    ),
    PrivateName(
        "lightning.pytorch.loops.training_epoch_loop",
        "_TrainingEpochLoop",
        _LOADER,
        "training asked for the iterator; its trainer's fit loop holds the loader states Lightning "
        "read from the checkpoint",
        _NO_HANDLE,
    ),
    PrivateName(
        "lightning.pytorch.loops.fit_loop",
        "_FitLoop",
        _LOADER,
        "training asked for the iterator (the fit loop starts it before the epoch loop runs)",
        _NO_HANDLE,
    ),
    PrivateName(
        "lightning.pytorch.loops.loop",
        "_Loop.<instance>.trainer",
        _LOADER,
        "from the training loop found on the stack to trainer.fit_loop",
        "the loop is only found on the stack; nothing public leads from a loader to its trainer",
    ),
    PrivateName(
        "lightning.pytorch.loops.fit_loop",
        "_FitLoop.<instance>._combined_loader_states_to_load",
        _LOADER,
        "the loader states Lightning read from the checkpoint. It applies them only when it is "
        "'restarting', so it skips them for a checkpoint written after an epoch finished, and when "
        "configure_optimizers reads estimated_stepping_batches (the loader is built before the "
        "restore); the loader applies them itself at its first batch",
        "the loader's load_state_dict is only ever called by Lightning; the checkpoint dict (e.g. "
        "on_load_checkpoint hooks) reaches callbacks and the module, never a loader",
    ),
    PrivateName(
        "lightning.pytorch.loops.fit_loop",
        "_FitLoop.<instance>._combined_loader",
        _LOADER,
        "the CombinedLoader the stashed states belong to",
        "trainer.train_dataloader returns the user's iterables, not the CombinedLoader that pairs "
        "them with the saved states",
    ),
    PrivateName(
        "lightning.pytorch.utilities.combined_loader",
        "CombinedLoader._load_state_dicts",
        _LOADER,
        "applies the stashed states exactly as Lightning's own restore does",
        "CombinedLoader.flattened (public) with each loader's load_state_dict would copy how "
        "Lightning pairs saved states with its stateful loaders, which is Lightning's to change",
    ),
    PrivateName(
        "lightning.pytorch.loops.fit_loop",
        "_FitLoop.<instance>.epoch_progress",
        _LOADER,
        "when fit stops before an epoch's last batch (max_steps, should_stop), Lightning still counts that "
        "epoch as processed, and a checkpoint written then (at on_train_epoch_end, on_train_end, or with "
        "trainer.save_checkpoint after fit) resumes at the next epoch. The loader, restored in the middle of "
        "that epoch, takes the count back so that Lightning resumes the epoch where it stopped",
        _NO_HANDLE + "; the checkpoint dict, which holds these counts, reaches callbacks and the module "
        "(on_load_checkpoint), never a loader, and a fix there would need a callback added by every user",
    ),
    PrivateName(
        "lightning.pytorch.loops.training_epoch_loop",
        "_TrainingEpochLoop.<instance>.batch_progress",
        _LOADER,
        "whether the restored epoch stopped before its last batch (is_last_batch, the batches done)",
        "trainer.fit_loop.epoch_loop.batch_progress is reached through the same private loop classes; "
        "no public property says whether the last epoch ran to its end",
    ),
    PrivateName(
        "lightning.pytorch.loops.loop",
        "_Loop.restarting",
        _LOADER,
        "a loop whose epoch was taken back restarts mid-epoch: the setter also marks the epoch and "
        "validation loops, as Lightning's own restore does",
        _NO_HANDLE,
    ),
    PrivateName(
        "lightning.pytorch.loops.loop",
        "_Loop.is_resuming",
        _LOADER,
        "only a loop just restored from a checkpoint has an epoch to take back",
        "Trainer.ckpt_path says a checkpoint was given, not whether the loops were restored from it yet",
    ),
    PrivateName(
        "lightning.pytorch.overrides.distributed",
        "_IndexBatchSamplerWrapper.<instance>._batch_sampler",
        _LOADER,
        "the predict loop rebuilds a loader with its batch sampler wrapped (to record indices); "
        "the loader finds its resumable sampler inside the wrapper",
        "the wrapper copies the batch sampler's attributes but is not one: isinstance fails, and "
        "Trainer(use_distributed_sampler=False) does not stop the wrapping",
    ),
)

_SEARCH_DEPTH = 32  # frames between ``iter(loader)`` and Lightning's loop (about 8 in Lightning 2.6)


def _loaded_classes(*names: tuple[str, str]) -> tuple[type, ...]:
    """The classes ``module.name`` of modules already imported (Lightning is never imported here)."""
    found = (getattr(sys.modules.get(module), name, None) for module, name in names)
    return tuple(cls for cls in found if isinstance(cls, type))


def _callers_of_caller() -> Iterator[FrameType]:
    """Frames up the stack, at most ``_SEARCH_DEPTH``, starting at the caller of the caller of the
    function iterating this generator (so the loader method that called that function is skipped)."""
    frame = inspect.currentframe()
    for _ in range(3):  # from this generator's frame past the function iterating it and its caller
        frame = frame.f_back if frame is not None else None
    for _ in range(_SEARCH_DEPTH):
        if frame is None:
            return
        yield frame
        frame = frame.f_back


class LightningFetcher:
    """A weak handle on the Lightning ``_PrefetchDataFetcher`` iterating a loader."""

    __slots__ = ("_ref",)

    def __init__(self, fetcher: object) -> None:
        self._ref = weakref.ref(fetcher)

    def held(self) -> int | None:
        """Batches drawn from the loader that the fetcher has not handed to the loop yet; ``None``
        once it is torn down (``fit`` returned: its buffer is dropped) or freed."""
        fetcher: Any = self._ref()
        if fetcher is None or fetcher.iterator is None:
            return None
        return len(fetcher.batches)

    def held_after_returning(self, returned: bool) -> int | None:
        """What :meth:`held` will be once the loader's ``__next__`` has returned (``returned``: with
        a batch): the fetcher of a loader without a length stores that batch instead of handing it
        on. ``None`` if the fetcher was freed."""
        fetcher: Any = self._ref()
        if fetcher is None:
            return None
        buffered = returned and fetcher.length is None and fetcher.prefetch_batches > 0
        return len(fetcher.batches) + (1 if buffered else 0)


def lightning_data_caller() -> tuple[LightningFetcher | None, bool]:
    """The Lightning fetcher calling ``iter()`` on the caller's loader, and whether an evaluation
    loop (validation, sanity check, test, predict) asked for the iterator.

    Call it from the loader's ``__iter__``: ``iter(loader)`` is called from inside the fetcher's
    ``__iter__`` / ``__next__``, which the loop calls, so both are found among the callers of
    ``__iter__``. The first loop found going up is the one iterating (validation runs nested in
    the training epoch loop). If a Lightning loop is found but no fetcher (its internals
    changed), this warns: a loader without a length would then be one batch off.
    """
    fetcher_classes = _loaded_classes(
        ("lightning.pytorch.loops.fetchers", "_DataFetcher"),
        ("lightning.pytorch.loops.fetchers", "_PrefetchDataFetcher"),
    )
    prefetch_classes = _loaded_classes(("lightning.pytorch.loops.fetchers", "_PrefetchDataFetcher"))
    eval_classes = _loaded_classes(
        ("lightning.pytorch.loops.evaluation_loop", "_EvaluationLoop"),
        ("lightning.pytorch.loops.prediction_loop", "_PredictionLoop"),
    )
    loop_classes = eval_classes + _loaded_classes(
        ("lightning.pytorch.loops.training_epoch_loop", "_TrainingEpochLoop"),
        ("lightning.pytorch.loops.fit_loop", "_FitLoop"),
    )
    if not loop_classes:
        return None, False  # Lightning's loops are not even imported
    fetcher: LightningFetcher | None = None
    any_fetcher = False
    for frame in _callers_of_caller():
        candidate = frame.f_locals.get("self")
        if candidate is None:
            continue
        if not any_fetcher and fetcher_classes and isinstance(candidate, fetcher_classes):
            any_fetcher = True
            if prefetch_classes and isinstance(candidate, prefetch_classes):
                fetcher = LightningFetcher(candidate)
        elif isinstance(candidate, loop_classes):
            if not any_fetcher:
                warnings.warn(
                    f"ResumableDataLoader: {type(candidate).__name__} is iterating this loader but no Lightning "
                    "data fetcher was found among its callers (Lightning's internals changed?). The saved "
                    "position cannot account for batches the fetcher prefetches, so with a loader without a "
                    "length a resume would be off by one batch.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return fetcher, isinstance(candidate, eval_classes)
    return fetcher, False


@dataclass(frozen=True)
class SkippedRestore:
    """Train loader states Lightning read from the checkpoint and has not applied (yet)."""

    loaders: list[Any]  # the train CombinedLoader's flattened iterables
    restarting: bool  # the fit loop is restarting: Lightning meant to apply them
    _fit_loop: Any
    _states: list[Any]

    def apply(self) -> None:
        """Load the states into the loaders as Lightning's ``_FitLoop._load_combined_loader_states``
        does (without its ``restarting`` gate), and let Lightning forget them."""
        self._fit_loop._combined_loader._load_state_dicts(self._states)
        self._fit_loop._combined_loader_states_to_load = []


def skipped_train_loader_restore() -> SkippedRestore | None:
    """The loader states of the fit run iterating the caller's loader that Lightning stashed from
    the checkpoint but did not apply, or ``None``.

    Call it from the loader's iterator (``__next__``), which the training loop calls. Lightning
    applies the stashed states in ``_FitLoop.setup_data`` only when it is restarting, so it
    skips them when the checkpoint was written after the epoch finished (it counts the epoch as
    done), and when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (the
    train loader is then built before the checkpoint is restored and ``setup_data`` never runs
    again).
    """
    classes = _loaded_classes(
        ("lightning.pytorch.loops.training_epoch_loop", "_TrainingEpochLoop"),
        ("lightning.pytorch.loops.fit_loop", "_FitLoop"),
    )
    if not classes:
        return None
    for frame in _callers_of_caller():
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, classes):
            fit_loop: Any = getattr(getattr(candidate, "trainer", None), "fit_loop", None)
            states = getattr(fit_loop, "_combined_loader_states_to_load", None)
            combined = getattr(fit_loop, "_combined_loader", None)
            if not states or combined is None:
                return None
            return SkippedRestore(list(combined.flattened), bool(fit_loop.restarting), fit_loop, states)
    return None


def distributed_sampler_kwargs_of_caller() -> dict[str, Any] | None:
    """``trainer.distributed_sampler_kwargs`` (public: the data-parallel ``num_replicas`` and
    ``rank``) of the trainer whose loop is calling the caller's loader, or ``None`` when no
    Lightning loop is found up the stack or the strategy is not a parallel one.

    Call it from the loader's ``__len__`` / ``__iter__``: Lightning's loops size the loader
    (``len``) when they set up its data and iterate it afterwards; both calls come from the loop.
    """
    classes = _loaded_classes(
        ("lightning.pytorch.loops.training_epoch_loop", "_TrainingEpochLoop"),
        ("lightning.pytorch.loops.fit_loop", "_FitLoop"),
        ("lightning.pytorch.loops.evaluation_loop", "_EvaluationLoop"),
        ("lightning.pytorch.loops.prediction_loop", "_PredictionLoop"),
    )
    if not classes:
        return None
    for frame in _callers_of_caller():
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, classes):
            trainer = getattr(candidate, "trainer", None)
            kwargs = getattr(trainer, "distributed_sampler_kwargs", None)
            return dict(kwargs) if kwargs else None
    return None


def _fit_loop_on_stack() -> Any:
    """The fit loop of the Lightning training loop found up the stack (see ``_callers_of_caller``)."""
    classes = _loaded_classes(
        ("lightning.pytorch.loops.training_epoch_loop", "_TrainingEpochLoop"),
        ("lightning.pytorch.loops.fit_loop", "_FitLoop"),
    )
    if not classes:
        return None
    for frame in _callers_of_caller():
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, classes):
            return getattr(getattr(candidate, "trainer", None), "fit_loop", None)
    return None


@dataclass(frozen=True)
class CutShortEpoch:
    """A fit loop restored from a checkpoint in which Lightning counts its last epoch as processed
    although that epoch stopped before its last batch (``max_steps``, ``trainer.should_stop``)."""

    epoch: int  # Lightning's number of the epoch that was cut short
    batches_done: int  # batches of that epoch trained before the stop
    _fit_loop: Any

    def reopen(self) -> None:
        """Take back Lightning's count of that epoch, so that it resumes it mid-way, as from a
        checkpoint written after a batch of that epoch, and marks its loops as restarting."""
        fit_loop = self._fit_loop
        progress = fit_loop.epoch_progress
        for tracker in (progress.current, progress.total):
            tracker.processed -= 1
            tracker.completed = tracker.processed
        fit_loop.restarting = True  # the setter marks the epoch and validation loops too


def _cut_short(fit_loop: Any) -> CutShortEpoch | None:
    if fit_loop is None or not getattr(fit_loop, "is_resuming", False):
        return None
    try:
        progress = fit_loop.epoch_progress
        batches = fit_loop.epoch_loop.batch_progress
    except AttributeError:  # pragma: no cover - a Lightning that moved its loops
        return None
    for epochs in (progress.current, progress.total):
        # every started epoch processed (on_train_epoch_end ran), completed or about to be
        if not (epochs.ready == epochs.started == epochs.processed >= 1):
            return None
        if epochs.completed not in (epochs.processed, epochs.processed - 1):
            return None
    done = batches.current
    if batches.is_last_batch or done.ready == 0 or done.completed != done.ready:
        return None  # the epoch ran to its last batch (or was ended by on_train_batch_start returning -1)
    return CutShortEpoch(epoch=progress.current.processed - 1, batches_done=done.completed, _fit_loop=fit_loop)


def cut_short_epoch_of_caller() -> CutShortEpoch | None:
    """The fit loop iterating the caller's loader, if it was just restored from a checkpoint that
    Lightning wrote as "epoch finished" although the epoch stopped before its last batch.

    Call it from the loader's ``__iter__``: Lightning's fit loop calls it in ``setup_data`` after
    restoring the checkpoint's loops (and the loader states, when it is restarting) and before it
    decides how to restart (``reset``) and calls ``set_epoch``, so a :meth:`CutShortEpoch.reopen`
    there is what Lightning then acts on.
    """
    return _cut_short(_fit_loop_on_stack())


def unwrap_index_batch_sampler(batch_sampler: Any) -> Any:
    """The batch sampler inside Lightning's ``_IndexBatchSamplerWrapper`` (the predict loop wraps
    a loader's batch sampler to record indices), else ``batch_sampler`` itself."""
    return getattr(batch_sampler, "_batch_sampler", batch_sampler)


# -- io and plugins: checkpoint loading and Lightning's CheckpointIO wrappers -------------------
_IO: tuple[PrivateName, ...] = (
    PrivateName(
        module="lightning.pytorch.core.saving",
        attribute="_load_state",
        used_by="lightning_utils.plugins.module_loading (through load_module_state below)",
        why="builds the LightningModule from a checkpoint dict already in memory: hparams with "
        "the given overrides, on_load_checkpoint, load_state_dict with strict",
        public="LightningModule.load_from_checkpoint does the same but only from a path or file "
        "object, which it reads with torch.load, so it cannot read a .sft file; handing it a "
        ".sft's contents would mean re-pickling the whole checkpoint in memory",
    ),
    PrivateName(
        module="lightning.pytorch.plugins.io.wrapper",
        attribute="_WrappingCheckpointIO.<instance>._checkpoint_io",
        used_by="lightning_utils.plugins.checkpoint_io (through replace_wrapped_checkpoint_io below)",
        why="ensure_safetensors_checkpoint_io swaps the TorchCheckpointIO inside a wrapper plugin "
        "(other than Lightning's own AsyncCheckpointIO, which is replaced whole) for a "
        "SafetensorsCheckpointIO",
        public="the wrapper's public checkpoint_io setter sets a base only while none is set, and "
        "the strategy's checkpoint_io getter has always set a TorchCheckpointIO by then, so the "
        "setter silently keeps it; a wrapper is found by its public checkpoint_io property (duck "
        "typing), not by the private base class",
    ),
    PrivateName(
        module="lightning.pytorch.callbacks.model_checkpoint",
        attribute="ModelCheckpoint._find_last_checkpoints",
        used_by="lightning_utils.callbacks.safetensors_model_checkpoint (through last_checkpoint_urls below)",
        why="Trainer.fit(ckpt_path='last') asks each ModelCheckpoint for its last files with this "
        "method; for a dirpath on object storage it returns the listing of fsspec's ls, which drops "
        "the URL scheme (bucket/run/last.sft), so Lightning then looks for that name on the local "
        "disk and finds no last checkpoint. SafetensorsModelCheckpoint overrides it to put the "
        "scheme back, and to name a sharded last.sft directory there by its index.json (the trainer "
        "compares the candidates' modification times, and fsspec has none for a prefix; a prefix "
        "without its index is an unfinished save and is left out)",
        public="Trainer.fit(ckpt_path=...) takes an explicit URL, but 'last' is resolved only "
        "through this method; ModelCheckpoint has no public hook for listing its files",
    ),
    PrivateName(
        module="lightning.pytorch.strategies.fsdp",
        attribute="FSDPStrategy.<instance>._state_dict_type",
        used_by="lightning_utils.plugins.module_loading (through fsdp_state_dict_type below)",
        why="names FSDP's state_dict_type in the error that refuses .sft under FSDP (sharded "
        "checkpoints also bypass the plugin when saving)",
        public="FSDPStrategy takes state_dict_type as a constructor argument and exposes no property for it",
    ),
    PrivateName(
        module="torch",
        attribute="Tensor._neg_view",
        used_by="lightning_utils.io.skeleton, lightning_utils.plugins.checkpoint_io",
        why="a lazily negated view (the negative bit, e.g. c.conj().imag) is stored as its raw "
        "memory plus the bit, and rebuilt as a negated view, so values and memory sharing come "
        "back as torch.load gives them",
        public="Tensor.neg() and Tensor.resolve_neg() materialise a copy that no longer shares "
        "memory with its base; no public API sets the negative bit on a view",
    ),
    PrivateName(
        module="torch",
        attribute="TypedStorage.<instance>._untyped_storage",
        used_by="lightning_utils.io.map_location",
        why="a map_location callable may return a TypedStorage; the tensor is rebuilt on its bytes",
        public="TypedStorage.untyped() returns the same storage but emits TypedStorage's deprecation warning",
    ),
)


def load_module_state(cls: type, checkpoint: dict[str, Any], strict: bool | None, **kwargs: Any) -> Any:
    """Lightning's own construction of ``cls`` (a ``LightningModule``) from a loaded checkpoint dict."""
    from lightning.pytorch.core.saving import _load_state

    return _load_state(cls, checkpoint, strict=strict, **kwargs)


def replace_wrapped_checkpoint_io(wrapper: Any, checkpoint_io: Any) -> None:
    """Make the CheckpointIO ``wrapper`` delegate to ``checkpoint_io`` instead of its current base."""
    wrapper._checkpoint_io = checkpoint_io


def last_checkpoint_urls(callback: Any, trainer: Any) -> set[str]:
    """``ModelCheckpoint._find_last_checkpoints`` with the URL scheme of a remote ``dirpath`` kept.

    A ``last`` that is a directory on object storage (a sharded ``.sft`` checkpoint) is returned
    as its ``index.json``: the trainer picks the newest candidate by its modification time, which
    a prefix does not have, and the index is the object whose time says when the save completed.
    A directory without its index is an unfinished save, not a checkpoint: it is left out.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_utils.io import remote
    from lightning_utils.io.sharded import INDEX_NAME

    found: set[str] = ModelCheckpoint._find_last_checkpoints(callback, trainer)
    if callback.dirpath is None or not remote.is_url(callback.dirpath):
        return found
    fs, _ = remote.filesystem(str(callback.dirpath))
    urls: set[str] = set()
    for p in found:
        url = p if remote.is_url(p) else fs.unstrip_protocol(p)
        if remote.kind(url) == "directory":
            index = f"{url.rstrip('/')}/{INDEX_NAME}"
            if remote.exists(index):
                urls.add(index)
        else:
            urls.add(url)
    return urls


def fsdp_state_dict_type(strategy: Any) -> str | None:
    """The ``state_dict_type`` an ``FSDPStrategy`` was built with (``"full"`` or ``"sharded"``)."""
    return getattr(strategy, "_state_dict_type", None)


# -- strategies: sharded .sft checkpoints under ModelParallelStrategy (FSDP2) ----------------------
_STRATEGIES: tuple[PrivateName, ...] = (
    PrivateName(
        module="lightning.pytorch.strategies.model_parallel",
        attribute="_align_compiled_param_names_with_module",
        used_by="lightning_utils.strategies.model_parallel (through align_compiled_param_names below)",
        why="a consolidated .sft keys the optimizer state by parameter index exactly as Lightning's own "
        "consolidated checkpoint does, so a single-device Trainer resumes it; Lightning first aligns the "
        "names of torch.compile'd submodules ('_orig_mod') with this function, then re-keys",
        public="torch's FSDP.rekey_optim_state_dict (used as well) re-keys but does not align compiled "
        "names; copying the alignment would let the two drift apart",
    ),
    PrivateName(
        module="torch.distributed.tensor",
        attribute="DTensor.__create_chunk_list__",
        used_by="lightning_utils.io.sharded.shards (local_block)",
        why="the offsets and extent of the block of the global tensor a DTensor holds on this rank, "
        "which every shard file records and every resharding read starts from",
        public="torch.distributed.checkpoint's planner calls this same protocol method; the function "
        "behind it (torch.distributed.tensor._utils.compute_local_shape_and_global_offset) is private "
        "and DTensor has no public property for the offsets",
    ),
)


def align_compiled_param_names(optimizer_state: dict[str, Any], module: Any) -> dict[str, Any]:
    """Lightning's renaming of optimizer-state keys of ``torch.compile``'d submodules (``_orig_mod``)."""
    from lightning.pytorch.strategies.model_parallel import _align_compiled_param_names_with_module

    return _align_compiled_param_names_with_module(optimizer_state, module)


# -- modules and module callbacks --------------------------------------------------------------
_MODULES: tuple[PrivateName, ...] = (
    PrivateName(
        module="torch._C._autograd",
        attribute="_get_current_graph_task_keep_graph",
        used_by="lightning_utils.modules.offload.function (through autograd_keeps_graph)",
        why="the backward of an offloaded block frees its pinned host copies, as autograd frees "
        "saved tensors, unless the running backward retains the graph (retain_graph=True): only "
        "this query tells an autograd Function's backward whether it does",
        public="torch.autograd.Function's ctx exposes needs_input_grad and saved_tensors but not "
        "retain_graph; ctx.save_for_backward would free the buffers at the right time, but "
        "saved-tensor hooks (save_on_cpu, an outer checkpoint) would then read them while the "
        "copy is in flight. Without the query the buffers are kept (the safe answer)",
    ),
    PrivateName(
        module="torch",
        attribute="Tensor._version",
        used_by="lightning_utils.modules.offload.host_copy (through tensor_version)",
        why="an input copied to the host and then changed in place before backward must be "
        "refused, as autograd refuses a modified saved tensor; the version counter is what "
        "autograd itself compares",
        public="torch.autograd.graph.increment_version only increments; saving the input with "
        "ctx.save_for_backward would give autograd's check but keeps the device tensor alive, "
        "which is what offloading avoids",
    ),
    PrivateName(
        module="torch.nn",
        attribute="Module._compiled_call_impl",
        used_by="lightning_utils.callbacks.compile_modules and lightning_utils.modules.swap "
        "(through is_compiled_in_place)",
        why="CompileModules must not compile a module twice, and ReplaceModules must refuse a "
        "module compiled in place (a replacement would silently drop the compiled call); "
        "Module.compile() records its compiled call only there",
        public="Module.compile() returns None and sets no public flag; isinstance(m, "
        "torch._dynamo.eval_frame.OptimizedModule) only detects torch.compile(m) wrappers, which "
        "CompileModules deliberately does not create",
    ),
    PrivateName(
        module="torch.nn",
        attribute="Module.<instance>._parameters",
        used_by="lightning_utils.modules.presets.SDPAMultiheadAttention.from_module (through "
        "shallow_copy_module, with _buffers and _modules)",
        why="re-classing an nn.MultiheadAttention keeps the very same Parameter objects, hooks "
        "and attributes; the copy needs registries of its own so that changing one module's "
        "parameters or children never changes the other's",
        public="copy.copy shares the registries; building a new module through its constructor "
        "initialises (and draws random numbers for) weights that are then thrown away, and drops "
        "hooks and attributes set on the old module; register_parameter on a shallow copy writes "
        "into the shared registry",
    ),
    PrivateName(
        module="torch.nn",
        attribute="Module.<instance>._buffers",
        used_by="lightning_utils.modules.presets (through shallow_copy_module)",
        why="as Module._parameters: the re-classed module's buffer registry must be its own",
        public="as Module._parameters",
    ),
    PrivateName(
        module="torch.nn",
        attribute="Module.<instance>._modules",
        used_by="lightning_utils.modules.presets (through shallow_copy_module)",
        why="as Module._parameters: the re-classed module's child registry must be its own",
        public="as Module._parameters",
    ),
)

if TYPE_CHECKING:
    from torch import Tensor, nn


def autograd_keeps_graph() -> bool:
    """Whether the backward now running keeps its graph (``retain_graph=True``); True when unknown."""
    import torch

    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def tensor_version(t: Tensor) -> int:
    """The in-place version counter of ``t`` (it grows with every in-place change)."""
    return t._version


def is_compiled_in_place(module: nn.Module) -> bool:
    """Whether ``module.compile()`` was called (its calls go through a compiled function)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def shallow_copy_module(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` holding the same parameters, buffers, children, hooks and
    attributes, but with registries of its own: registering or replacing a parameter, buffer or
    child on one of the two leaves the other as it was."""
    import copy

    new = copy.copy(module)
    for attr in ("_parameters", "_buffers", "_modules"):
        setattr(new, attr, dict(getattr(module, attr)))
    return new


# -- training control, metrics and the other callbacks ------------------------------------------
_CONTROL_USER = "lightning_utils.callbacks.training_control"
_CONTROL_EVAL_WHY = (
    "the 'eval' command runs the fit's own validation loop at a step boundary, exactly as the epoch loop does at "
    "a val check (trainer.validating, val_loop.run(), then the logger connector's first-iteration flag put back)"
)
_CONTROL_EVAL_PUBLIC = (
    "Lightning has no public 'validate now' during fit: val_check_interval is fixed when fit starts, and "
    "trainer.validate() is a run of its own (its own setup and teardown), not a step of a running fit; users "
    "who want no internals pass eval_fn="
)
_EXPORT_USER = "lightning_utils.io.hf_export (for lightning_utils.callbacks.export_weights)"
_EXPORT_PUBLIC = (
    "save_pretrained is the public route, but it needs every tensor of a shard in memory at once (it takes a "
    "state dict), which a sharded model gathered one tensor at a time never has"
)
_CONTROL: tuple[PrivateName, ...] = (
    PrivateName(
        "lightning.pytorch.trainer.trainer",
        "Trainer.<instance>._accelerator_connector",
        _CONTROL_USER,
        "a single-device run keeps its cluster environment (SLURM auto-requeue and its signal) only there; "
        "TrainingControl leaves the requeue signal to Lightning, as Lightning's signal connector reads it",
        "trainer.strategy.cluster_environment: only parallel strategies have it, and it is read first",
    ),
    PrivateName(
        "lightning.pytorch.trainer.connectors.accelerator_connector",
        "_AcceleratorConnector.<instance>.cluster_environment",
        _CONTROL_USER,
        "see Trainer._accelerator_connector",
        "trainer.strategy.cluster_environment (parallel strategies only)",
    ),
    PrivateName(
        "lightning.pytorch.loops.fit_loop",
        "_FitLoop.<instance>.epoch_loop",
        _CONTROL_USER,
        _CONTROL_EVAL_WHY,
        _CONTROL_EVAL_PUBLIC,
    ),
    PrivateName(
        "lightning.pytorch.loops.training_epoch_loop",
        "_TrainingEpochLoop.<instance>.val_loop",
        _CONTROL_USER,
        _CONTROL_EVAL_WHY,
        _CONTROL_EVAL_PUBLIC,
    ),
    PrivateName(
        "lightning.pytorch.loops.evaluation_loop",
        "_EvaluationLoop.run",
        _CONTROL_USER,
        _CONTROL_EVAL_WHY,
        _CONTROL_EVAL_PUBLIC,
    ),
    PrivateName(
        "lightning.pytorch.trainer.trainer",
        "Trainer.<instance>._logger_connector",
        _CONTROL_USER,
        _CONTROL_EVAL_WHY,
        _CONTROL_EVAL_PUBLIC,
    ),
    PrivateName(
        "lightning.pytorch.trainer.connectors.logger_connector.logger_connector",
        "_LoggerConnector.<instance>._first_loop_iter",
        _CONTROL_USER,
        "a validation run changes the logger connector's first-iteration flag; the epoch loop saves it before its "
        "own val checks inside the training loop and puts it back after, so the 'eval' command does the same",
        _CONTROL_EVAL_PUBLIC,
    ),
    PrivateName(
        "lightning.pytorch.trainer.trainer",
        "Trainer.<instance>._checkpoint_connector",
        _CONTROL_USER,
        "TrainingControl's save builds the checkpoint dict with Lightning's own dump_checkpoint, writes it with "
        "the strategy's public save_checkpoint, then has every rank report whether its part failed before any "
        "rank goes on, so that a write failing on rank 0 ends every rank with that error",
        "Trainer.save_checkpoint does the same three steps in one call, ending in a barrier: a write that fails "
        "on rank 0 skips that barrier while the other ranks wait in it, so they hang until the process-group "
        "timeout (or die on a closed connection) instead of raising the error",
    ),
    PrivateName(
        "lightning.pytorch.trainer.connectors.checkpoint_connector",
        "_CheckpointConnector.dump_checkpoint",
        _CONTROL_USER,
        "see Trainer._checkpoint_connector: the checkpoint dict Trainer.save_checkpoint would write",
        "see Trainer._checkpoint_connector",
    ),
    PrivateName(
        "lightning.pytorch.callbacks.model_checkpoint",
        "ModelCheckpoint.<instance>._last_checkpoint_saved",
        _CONTROL_USER,
        "when TrainingControl points a ModelCheckpoint's save_last file or link at its own newer checkpoint, "
        "the ModelCheckpoint must count that file as its latest save: with save_last='link' it re-links "
        "'last' to this file at the next epoch or validation end, and at the end of training it writes no "
        "extra 'last' when one was saved",
        "last_model_path (public) names the 'last' file itself, not the checkpoint it copies or links to; "
        "ModelCheckpoint has no public method to record a save made by someone else",
    ),
    PrivateName(
        "torch.optim.lr_scheduler",
        "SequentialLR.<instance>._schedulers",
        "lightning_utils.control.actions",
        "the 'lr' command rebases the schedulers a SequentialLR holds, so that their closed-form schedules "
        "continue from the new lr",
        "none: SequentialLR exposes its schedulers only as state_dict()['_schedulers'], copies of their states",
    ),
    PrivateName(
        "transformers.modeling_utils",
        "remove_tied_weights_from_state_dict",
        _EXPORT_USER,
        "a Hugging Face export leaves out the tied duplicates (lm_head.weight) exactly as save_pretrained does; "
        "called on meta tensors, it finds the ties by parameter identity in the model",
        _EXPORT_PUBLIC + "; without this function (older transformers) the tied keys are dropped by "
        "parameter identity and _tied_weights_keys",
    ),
    PrivateName(
        "transformers.core_model_loading",
        "revert_weight_conversion",
        _EXPORT_USER,
        "a Hugging Face export writes the checkpoint names save_pretrained writes for models whose weights are "
        "renamed on load; called on meta tensors, a pure renaming is read back by tensor identity",
        _EXPORT_PUBLIC + "; without this function (older transformers) the model's own names are written",
    ),
    PrivateName(
        "transformers.modeling_utils",
        "PreTrainedModel._keys_to_ignore_on_save",
        _EXPORT_USER,
        "keys a model asks save_pretrained not to write are left out of a Hugging Face export too",
        _EXPORT_PUBLIC,
    ),
    PrivateName(
        "transformers.modeling_utils",
        "PreTrainedModel._tied_weights_keys",
        _EXPORT_USER,
        "which of the names sharing one parameter are the tied duplicates, for transformers releases without "
        "remove_tied_weights_from_state_dict",
        _EXPORT_PUBLIC,
    ),
    PrivateName(
        "torch.optim.lr_scheduler",
        "ChainedScheduler.<instance>._schedulers",
        "lightning_utils.control.actions",
        "the 'lr' command rebases the schedulers a ChainedScheduler holds (see SequentialLR._schedulers)",
        "none: ChainedScheduler exposes its schedulers only as state_dict()['_schedulers'], copies of their states",
    ),
)


def cluster_environment(trainer: Any) -> Any:
    """The trainer's cluster environment: the strategy's (parallel strategies), else the one
    Lightning's accelerator connector chose (single-device runs); ``None`` when neither is found."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None:
        env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return env


def run_fit_validation(trainer: Any) -> bool:
    """Run the fit loop's validation loop now, as the training epoch loop does at a val check.

    Returns False, having run nothing, when this Lightning keeps these internals elsewhere.
    """
    try:
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        connector = trainer._logger_connector
        first_loop_iter = connector._first_loop_iter
    except AttributeError:  # pragma: no cover - a Lightning that moved these internals
        return False
    trainer.validating = True
    try:
        val_loop.run()
    finally:
        trainer.training = True
        connector._first_loop_iter = first_loop_iter
    return True


def dump_checkpoint(trainer: Any) -> dict[str, Any]:
    """The whole checkpoint dict ``trainer.save_checkpoint`` would write now (a collective under
    sharded strategies: every rank calls it)."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def note_checkpoint_saved(model_checkpoint: Any, path: str) -> None:
    """Make ``path`` the latest checkpoint a ``ModelCheckpoint`` counts as saved (what its
    ``save_last='link'`` links to)."""
    model_checkpoint._last_checkpoint_saved = path


def inner_lr_schedulers(scheduler: Any) -> list[Any]:
    """The schedulers a ``SequentialLR`` or ``ChainedScheduler`` holds; ``[]`` for any other scheduler."""
    inner = getattr(scheduler, "_schedulers", None)
    return list(inner) if isinstance(inner, (list, tuple)) else []


# -- optim, cli and everything else -------------------------------------------------------------
# torch's multi-tensor ("foreach") kernels that Apollo's step batches its elementwise work with.
_FOREACH_OPS = (
    "_foreach_add_",
    "_foreach_addcdiv_",
    "_foreach_addcmul_",
    "_foreach_copy_",
    "_foreach_div_",
    "_foreach_lerp_",
    "_foreach_mul_",
    "_foreach_sqrt",
)

_OTHER: tuple[PrivateName, ...] = (
    PrivateName(
        module="lightning.pytorch.cli",
        attribute="LightningCLI._parse_ckpt_path",
        used_by="lightning_utils.cli.lightning, through lightning_cli_class() below",
        why="LightningCLI calls this method after parsing the arguments and before instantiating the "
        "classes, to re-read the model's saved hyperparameters from --ckpt_path with torch.load, which "
        "cannot read a safetensors .sft checkpoint; the override reads .sft files with lightning_utils.io "
        "and leaves every other file to Lightning's own method",
        public="LightningCLI.parse_arguments and before_instantiate_classes are public hooks that run "
        "before and after this step, but neither replaces it: Lightning's torch.load of the .sft file would "
        "still run (and fail) in between unless ckpt_path were hidden from the config and restored, which "
        "depends on the same private ordering and is harder to follow",
    ),
    *(
        PrivateName(
            module="torch",
            attribute=name,
            used_by="lightning_utils.optim.apollo",
            why="Apollo's step updates every tensor of a param group in one multi-tensor kernel per "
            "operation (moments, limiter, update, weight decay), as torch.optim.AdamW(foreach=True) does",
            public="the public per-tensor in-place ops give the same values but one kernel launch per "
            "tensor, which makes the step several times slower on models with many small tensors; torch "
            "has no public multi-tensor API",
        )
        for name in _FOREACH_OPS
    ),
)


def lightning_cli_class(read_ckpt_hparams: Callable[[LightningCLI], bool]) -> type[LightningCLI]:
    """A ``LightningCLI`` subclass that offers its ``--ckpt_path`` hyperparameter step to
    ``read_ckpt_hparams(cli)`` first.

    LightningCLI re-reads the model's saved hyperparameters from ``--ckpt_path`` after parsing
    the arguments and before instantiating the classes. In the returned class that step calls
    ``read_ckpt_hparams(cli)``, which updates ``cli.config`` and returns True for a file it
    handles, or returns False to leave the file to Lightning's own code (``torch.load``).
    """
    from lightning.pytorch.cli import LightningCLI

    class _LightningUtilsCLI(LightningCLI):
        def _parse_ckpt_path(self) -> None:
            if not read_ckpt_hparams(self):
                super()._parse_ckpt_path()

    return _LightningUtilsCLI


PRIVATE_NAMES: tuple[PrivateName, ...] = (*_DATA, *_IO, *_STRATEGIES, *_MODULES, *_CONTROL, *_OTHER)


def _resolve(entry: PrivateName) -> bool:
    try:
        obj: object = importlib.import_module(entry.module)
    except ImportError:
        return False
    parts = entry.attribute.split(".")
    if "<instance>" in parts:
        owner_path, name = parts[: parts.index("<instance>")], parts[-1]
        for part in owner_path:
            obj = getattr(obj, part, None)
            if obj is None:
                return False
        try:
            source = inspect.getsource(obj)  # type: ignore[arg-type]
        except (OSError, TypeError):
            return False
        return f"self.{name}" in source
    for part in parts:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def missing_private_names() -> list[PrivateName]:
    """The listed names that the installed Lightning / torch no longer has."""
    return [entry for entry in PRIVATE_NAMES if not _resolve(entry)]
