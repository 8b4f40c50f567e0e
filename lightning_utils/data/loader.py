"""``ResumableDataLoader``: a ``DataLoader`` whose position Lightning saves and restores.

Lightning stores ``state_dict()`` of every train loader that has ``state_dict`` and
``load_state_dict`` under ``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]``
and calls ``load_state_dict`` before it creates the iterator. This loader's state is the
position of its :class:`~lightning_utils.data.samplers.ResumableSampler` after the batches the
training loop has **consumed**: the batches handed to the main process, minus the ones
Lightning's fetcher still holds (it prefetches one batch of a loader without a length, to know
when the loader ends). It is never the sampler's own counter, which runs
``num_workers * prefetch_factor`` batches ahead with worker processes. Restoring is O(1): the
skip is folded into the sampler's position, no sample is fetched or discarded.

Behaviour worth knowing:

- A new pass (``iter()``) starts where the previous pass's *consumption* stopped, so batches
  that workers prefetched but the loop never used are not lost, with or without a restart.
- Evaluation loaders (validation, sanity check, test, predict) start every run at the
  beginning of the sampler's current epoch, as a plain ``DataLoader`` does, so a sanity check
  or ``limit_val_batches`` never shifts the next validation run. The same loader object may
  serve as train and val loader: evaluation runs leave the training position alone.
- The iterator is lazy: the sampler's pass starts at the first ``next()``, so Lightning's
  ``set_epoch`` (called after ``iter()``, also right after restoring a mid-epoch checkpoint) is
  honoured and a restored position of the same epoch is kept.
- If Lightning stashed the checkpoint's loader state but never applied it, the first ``next()``
  applies it itself: Lightning skips it for checkpoints written after an epoch finished
  (``ModelCheckpoint``'s default save at the epoch's end, ``save_checkpoint`` after ``fit``),
  and when it built the loader before restoring the checkpoint (``configure_optimizers`` reading
  ``trainer.estimated_stepping_batches``; a loader without a length, whose first batch
  Lightning then prefetched from the wrong position, raises instead).
- The position survives ``Trainer.fit`` returning: ``trainer.save_checkpoint`` afterwards
  records where training stopped.
- An epoch that ``max_steps`` or ``trainer.should_stop`` ended before its last batch is one
  Lightning counts as finished: a checkpoint written then (``on_train_epoch_end``,
  ``on_train_end``, ``trainer.save_checkpoint`` after ``fit``) would resume at the next epoch.
  When Lightning restores such a checkpoint, the loader (whose state says where in the epoch
  training stopped) gives Lightning that epoch back before it restarts, so the resumed run
  finishes the epoch exactly as an uninterrupted run would, then goes on with the next ones.
- The samplers subclass ``DistributedSampler``, and with ``batch_sampler=`` ``loader.sampler``
  is that batch sampler, so Lightning's ``use_distributed_sampler=True`` leaves the loader as
  it is instead of wrapping the sampler; the samplers shard themselves, by the *data-parallel*
  rank and size: when a Lightning loop sizes or iterates the loader, the loader passes the
  trainer's ``distributed_sampler_kwargs`` to its sampler (``set_replicas``), so under tensor
  parallelism the ranks of one tensor-parallel group see the same samples (a sampler built
  with explicit ``num_replicas``/``rank`` keeps them).

The loader drives its sampler only through the resume contract documented in
:mod:`lightning_utils.data.samplers.base`, and learns which Lightning loop and fetcher iterate
it only through :mod:`lightning_utils._internals`.

This module must never fast-forward by fetching data, never keep a strong reference to a
running worker iterator, never accept a sampler it cannot resume (it raises instead), and never
import ``lightning`` or touch a Lightning-private name itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler

from lightning_utils._internals import (
    LightningFetcher,
    SkippedRestore,
    cut_short_epoch_of_caller,
    distributed_sampler_kwargs_of_caller,
    lightning_data_caller,
    skipped_train_loader_restore,
    unwrap_index_batch_sampler,
)
from lightning_utils.data.samplers.base import Bookmark, Pass, ResumableSampler
from lightning_utils.data.samplers.ordered import OrderedSampler
from lightning_utils.data.samplers.pool import default_seed
from lightning_utils.data.samplers.random import RandomSampler

__all__ = ["ResumableDataLoader"]

_STATE_NAME = "ResumableDataLoader"
_STATE_VERSION = 1


def _apply_skipped_restore(skipped: SkippedRestore | None, can_apply: bool) -> None:
    """Load the train loader states that Lightning stashed from the checkpoint but never applied.

    Lightning skips them when the checkpoint was written after the epoch finished
    (``ModelCheckpoint``'s default save at ``on_train_epoch_end``, or at the end of the epoch's
    validation: Lightning counts the epoch as done), so our loader would start from scratch: a
    ``PoolSampler`` bag would start again from its first draw, and a loader without a length
    would prefetch its first batch before ``set_epoch`` and train the old epoch's order. It also
    skips them when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``, which
    builds the train loader before the checkpoint is restored.

    Our iterator is lazy, so at the first ``next()`` of a pass no batch has been drawn yet
    (``can_apply``): load the stashed states now. Later (a loader without a length whose first
    batch Lightning prefetched before the skipped restore) it is too late, and this raises
    instead of training on the wrong samples.
    """
    if skipped is None:
        return
    if not can_apply:
        raise RuntimeError(
            "ResumableDataLoader: Lightning never restored the train loader's position (it built the loader "
            "before loading the checkpoint, e.g. for `trainer.estimated_stepping_batches` in "
            "`configure_optimizers`, Lightning #20550) and, the loader having no length, already drew a "
            "batch from the start of the epoch. Give the sampler a length or compute the schedule "
            "without `estimated_stepping_batches`."
        )
    if skipped.restarting:  # Lightning meant to restore and missed it: worth telling
        warnings.warn(
            "ResumableDataLoader: Lightning skipped restoring the train loader's position (it built the "
            "loader early, e.g. for `trainer.estimated_stepping_batches`, Lightning #20550); restoring it "
            "now, before the first batch.",
            stacklevel=2,
        )
    # This runs after Lightning's set_epoch (a restore normally runs before it), and loading a
    # state drops a pending set_epoch: keep those requests.
    samplers = [dl.sampler for dl in skipped.loaders if isinstance(dl, ResumableDataLoader)]
    requests = [sampler.bookmark().requested for sampler in samplers]
    skipped.apply()
    for sampler, requested in zip(samplers, requests):
        if requested is None:
            continue
        restored = sampler.bookmark()
        finite = sampler.plan_pass().length is not None  # an endless sampler's stream goes on either way
        if finite and _stands_mid_epoch(sampler) and restored.epoch_arg not in (None, requested):
            # A checkpoint of an epoch that fit stopped early (max_steps, should_stop): the loader
            # gives Lightning such an epoch back in ``__iter__`` (see ``_resume_cut_short_epoch``),
            # which Lightning does not call between its restore and its restart when it built the
            # loader early; it has moved on to the next epoch already.
            warnings.warn(
                f"ResumableDataLoader: the checkpoint was written when fit stopped in the middle of epoch "
                f"{restored.epoch_arg}, but Lightning built the train loader before restoring it (e.g. for "
                "`trainer.estimated_stepping_batches` in `configure_optimizers`, Lightning #20550) and has "
                f"already started epoch {requested}: the rest of epoch {restored.epoch_arg} is skipped. Resume "
                "from a checkpoint written at a step boundary (ModelCheckpoint(every_n_train_steps), "
                "TrainingControl), or compute the schedule without `estimated_stepping_batches`.",
                stacklevel=2,
            )
        sampler.seek(replace(restored, requested=requested))


def _stands_mid_epoch(sampler: ResumableSampler) -> bool:
    """Whether the sampler's next pass continues an epoch begun before (an endless sampler always does)."""
    plan = sampler.plan_pass()
    return plan.length is None or (plan.start > 0 and (plan.epoch, plan.start) == sampler.bookmark().effective())


class _PassTracker:
    """What the loader knows about one pass: its plan and the batches handed out."""

    __slots__ = ("fetcher", "frozen", "held_after", "plan", "yielded")

    def __init__(self, plan: Pass, fetcher: LightningFetcher | None) -> None:
        self.plan = plan
        self.yielded = 0
        self.fetcher = fetcher
        self.held_after = 0  # batches the fetcher held after our last next(), for after teardown
        self.frozen: int | None = None  # consumption fixed when the next pass was requested

    def note_fetcher(self, returned: bool) -> None:
        held = self.fetcher.held_after_returning(returned) if self.fetcher is not None else None
        if held is not None:
            self.held_after = held

    def freeze(self) -> None:
        """Fix the consumed count now: a new ``iter()`` replaces this pass, and the fetcher is about
        to drop the batches it prefetched from it without handing them to the loop."""
        if self.frozen is None:
            self.frozen = self.consumed()

    def consumed(self) -> int:
        if self.frozen is not None:
            return self.frozen
        held = 0
        if self.fetcher is not None:
            # A torn-down fetcher (fit returned) has dropped its buffer, or was freed: use what
            # we recorded while it ran.
            now = self.fetcher.held()
            held = self.held_after if now is None else now
        return max(0, self.yielded - held)


class _ResumableIterator(Iterator[Any]):
    """Lazy iterator: starts the sampler's pass and the DataLoader iterator at the first ``next()``."""

    def __init__(self, loader: ResumableDataLoader, fetcher: LightningFetcher | None, evaluating: bool) -> None:
        self._loader = loader
        self._fetcher = fetcher
        self._evaluating = evaluating
        self._inner: Iterator[Any] | None = None
        self._tracker: _PassTracker | None = None

    def __iter__(self) -> _ResumableIterator:
        return self

    def __len__(self) -> int:
        return len(self._loader)

    def _start(self) -> _PassTracker:
        loader = self._loader
        sampler = loader._resumable
        if self._evaluating:
            # Every evaluation run (validation, sanity check, test, predict) sees the whole epoch
            # from its start, as with a plain DataLoader; Lightning saves no evaluation position.
            # The training position (if this loader also trains) is kept aside and untouched.
            if loader._tracker is None and loader._idle_state is None:
                loader._idle_state = replace(sampler.bookmark(), requested=None)
            here = sampler.bookmark()
            sampler.seek(replace(here, epoch=here.effective()[0], position=0))
            tracker = _PassTracker(sampler.plan_pass(), self._fetcher)
            self._inner = DataLoader.__iter__(loader)
            return tracker
        _apply_skipped_restore(skipped_train_loader_restore(), can_apply=True)
        previous = loader._tracker
        if previous is not None:
            # Continue where the loop stopped consuming, not where prefetching stopped.
            state = loader._sampler_state(previous)
            sampler.seek(replace(sampler.bookmark(), epoch=state["epoch"], position=state["position"]))
        elif loader._idle_state is not None:
            # Back to the training position that evaluation passes set aside.
            sampler.seek(replace(loader._idle_state, requested=sampler.bookmark().requested))
        loader._idle_state = None
        tracker = _PassTracker(sampler.plan_pass(), self._fetcher)
        loaded, loader._loaded = loader._loaded, None
        if loaded is not None and self._fetcher is not None:
            loader._check_world_size_change(tracker.plan, *loaded)
        loader._tracker = tracker
        self._inner = DataLoader.__iter__(loader)
        return tracker

    def __next__(self) -> Any:
        tracker = self._tracker
        if tracker is None:
            tracker = self._tracker = self._start()
        assert self._inner is not None
        try:
            batch = next(self._inner)
        except StopIteration:
            tracker.note_fetcher(returned=False)
            raise
        tracker.yielded += 1
        if tracker.fetcher is not None:
            tracker.note_fetcher(returned=True)
            if tracker.yielded == 2 and not self._evaluating:
                # The first batch may have been prefetched before a skipped restore.
                _apply_skipped_restore(skipped_train_loader_restore(), can_apply=False)
        return batch


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with ``state_dict`` / ``load_state_dict`` for exact mid-epoch resume.

    Takes the arguments of ``torch.utils.data.DataLoader``. The index order must come from a
    sampler of :mod:`lightning_utils.data.samplers`:

    - ``sampler=`` one of them (with ``batch_size``), or
    - ``batch_sampler=`` a :class:`~lightning_utils.data.samplers.BatchedOrderedSampler` (or a
      ``torch.utils.data.BatchSampler`` over one of them), or
    - neither: ``shuffle=True`` builds a ``RandomSampler(len(dataset))`` seeded from
      ``generator`` (else ``PL_GLOBAL_SEED``, else 0) and ``shuffle=False`` an ``OrderedSampler``.

    Any other sampler raises ``TypeError``; ``in_order=False`` raises ``ValueError`` (batches
    would arrive out of order and no position could describe what was consumed). Iterate one
    iterator at a time.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: Any = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
    ) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                "ResumableDataLoader: `dataset` is an IterableDataset; its position lives in the dataset, "
                "not in a sampler. Use a map-style dataset with a lightning_utils sampler."
            )
        if not in_order:
            raise ValueError("ResumableDataLoader: `in_order=False` cannot be resumed exactly; use in_order=True")
        batch_units = 1
        loader_drop_last = False
        if batch_sampler is not None:
            # Lightning's predict loop wraps the batch sampler to record indices; look inside.
            inner = unwrap_index_batch_sampler(batch_sampler)
            if isinstance(inner, ResumableSampler):
                resumable = inner
            elif isinstance(inner, BatchSampler) and isinstance(inner.sampler, ResumableSampler):
                resumable = inner.sampler
                batch_units, loader_drop_last = inner.batch_size, inner.drop_last
            else:
                raise TypeError(
                    "ResumableDataLoader: `batch_sampler` must be a lightning_utils.data.samplers sampler (e.g. "
                    "BatchedOrderedSampler) or a torch BatchSampler over one, got "
                    f"{type(batch_sampler).__name__}"
                )
        else:
            if sampler is None:
                if shuffle:
                    seed = generator.initial_seed() if generator is not None else default_seed()
                    sampler = RandomSampler(len(dataset), seed=seed)  # type: ignore[arg-type]
                else:
                    sampler = OrderedSampler(len(dataset))  # type: ignore[arg-type]
                shuffle = None
            elif isinstance(sampler, SequentialSampler) and not shuffle:
                # Lightning swaps in a SequentialSampler for `overfit_batches`; same order, resumable.
                sampler = OrderedSampler(len(sampler))
            if not isinstance(sampler, ResumableSampler):
                raise TypeError(
                    "ResumableDataLoader: `sampler` must be a lightning_utils.data.samplers sampler "
                    f"(OrderedSampler, RandomSampler, PoolSampler), got {type(sampler).__name__}"
                )
            resumable = sampler
            if batch_size is not None:
                batch_units, loader_drop_last = batch_size, drop_last
        # Set before DataLoader.__init__ (which forbids setting `sampler` afterwards).
        self._resumable: ResumableSampler = resumable
        self._batch_units = int(batch_units)
        self._loader_drop_last = bool(loader_drop_last)
        self._tracker: _PassTracker | None = None
        # The sampler position to return to after evaluation passes that ran before any training
        # pass.
        self._idle_state: Bookmark | None = None
        # (epoch, position, num_replicas) of the last loaded state, until the next pass checks it.
        self._loaded: tuple[int, int, int | None, int] | None = None
        super().__init__(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            drop_last=drop_last,
            timeout=timeout,
            worker_init_fn=worker_init_fn,
            multiprocessing_context=multiprocessing_context,
            generator=generator,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            pin_memory_device=pin_memory_device,
            in_order=in_order,
        )

    # ``loader.sampler`` is always the resumable sampler, also with ``batch_sampler=``: Lightning
    # then sees a DistributedSampler (and does not wrap it) and calls its ``set_epoch``.
    @property  # type: ignore[override]
    def sampler(self) -> ResumableSampler:
        return self._resumable

    @sampler.setter
    def sampler(self, value: Any) -> None:
        self.__dict__["_dataloader_sampler"] = value  # what DataLoader.__init__ assigned

    def __len__(self) -> int:
        self._follow_trainer_shard()
        return super().__len__()

    def _follow_trainer_shard(self) -> None:
        """Shard by the data-parallel rank and size of the trainer using this loader.

        Under tensor (model) parallelism they are not the process group's global rank and world
        size: the ranks of one tensor-parallel group must see the same samples. Lightning sizes
        (``len``) and iterates its loaders from its loops, after the strategy exists, so the
        loader reads ``trainer.distributed_sampler_kwargs`` there and hands it to the sampler
        (``set_replicas``); a loader built before the strategy existed is sharded right.
        """
        kwargs = distributed_sampler_kwargs_of_caller()
        if kwargs is not None and "num_replicas" in kwargs and "rank" in kwargs:
            self._resumable.set_replicas(int(kwargs["num_replicas"]), int(kwargs["rank"]))

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._follow_trainer_shard()
        fetcher, evaluating = lightning_data_caller()
        if not evaluating:
            if self._tracker is not None:
                # Now, not at the lazy first next(): by then Lightning's fetcher has reset and forgotten
                # the batch it prefetched from the old pass and never trained on (a loader without a
                # length that Lightning stops at the end of an epoch it resumed on its last batch).
                self._tracker.freeze()
            self._resume_cut_short_epoch()
        return _ResumableIterator(self, fetcher, evaluating)

    def _resume_cut_short_epoch(self) -> None:
        """Continue an epoch that ``max_steps`` or ``should_stop`` ended before its last batch.

        Lightning counts such an epoch as processed, so a checkpoint written then
        (``on_train_epoch_end``, ``on_train_end``, ``trainer.save_checkpoint`` after ``fit``)
        would resume at the next epoch and skip the rest of this one, although this loader's
        state says where in the epoch training stopped. When Lightning restores such a
        checkpoint it iterates the train loader before deciding how to restart: here the loader
        applies its state (Lightning skips it for an epoch it counts as done) and, standing in
        the middle of that epoch, gives Lightning its epoch back to finish.
        """
        cut = cut_short_epoch_of_caller()
        if cut is None:
            return
        _apply_skipped_restore(skipped_train_loader_restore(), can_apply=True)
        here = self._resumable.bookmark()
        if here.epoch_arg not in (None, cut.epoch) or here.requested is not None:
            return  # this state belongs to another epoch than the one Lightning stopped
        if _stands_mid_epoch(self._resumable):
            cut.reopen()

    # -- state -------------------------------------------------------------------------------
    def _batches_in_pass(self, units: int) -> int:
        if self._batch_units == 1:
            return units
        if self._loader_drop_last:
            return units // self._batch_units
        return -(-units // self._batch_units)

    def _sampler_state(self, tracker: _PassTracker) -> dict[str, Any]:
        plan = tracker.plan
        consumed = tracker.consumed()
        if plan.length is None:  # endless sampler
            return self._resumable.state_after(plan, consumed * self._batch_units, finished=False)
        units = min(consumed * self._batch_units, plan.length)
        finished = consumed >= self._batches_in_pass(plan.length)
        return self._resumable.state_after(plan, units, finished)

    def _check_world_size_change(
        self, plan: Pass, epoch: int, position: int, saved_replicas: Any, saved_units_per_batch: int
    ) -> None:
        """Refuse a mid-epoch resume on another world size that Lightning would cut short.

        The position is global, so the sampler itself continues the epoch on any world size. But
        Lightning restores its own count of the epoch's batches done (those of the old world
        size) and ends the epoch when that count reaches ``len(loader)`` of the new one: with
        more ranks it would stop before the remaining samples are through, or skip to the next
        epoch at once. That silently skips samples, so raise instead. The count is taken in the
        saving run's batches (``saved_units_per_batch``): the same global batch on more ranks, each
        with a smaller batch, keeps the count right and goes on.
        """
        if not isinstance(saved_replicas, int) or saved_replicas == plan.num_replicas or plan.length is None:
            return
        if not 0 < position < plan.epoch_size:
            return  # at an epoch boundary any world size is fine
        # Lightning's restored count of the epoch's batches done, in the saving run's batches
        done = -(-position // (saved_replicas * saved_units_per_batch))
        if (plan.epoch, plan.start) == (epoch, position):
            try:
                total = len(self)
            except TypeError:
                return  # no length: Lightning runs the pass to its end
            remaining = self._batches_in_pass(plan.length)
            if done + remaining <= total:
                return
            what = f"Lightning would end the epoch after {max(0, total - done)} of the {remaining} remaining batches"
        else:
            what = f"Lightning moved on to epoch {plan.epoch}, skipping the rest of epoch {epoch}"
        raise RuntimeError(
            f"ResumableDataLoader: the checkpoint was written mid-epoch with {saved_replicas} rank(s) "
            f"({done} batches of the epoch done) and is resumed with {plan.num_replicas}; {what}, so samples "
            "would be skipped. Resume on the same number of ranks, or from a checkpoint at an epoch boundary."
        )

    def state_dict(self) -> dict[str, Any]:
        """The sampler position after the batches the training loop consumed (a few integers)."""
        tracker = self._tracker
        if tracker is None and self._idle_state is not None:
            sampler_state, consumed = self._resumable.state_at(self._idle_state), 0
        elif tracker is None:
            sampler_state, consumed = self._resumable.state_dict(), 0
        else:
            sampler_state, consumed = self._sampler_state(tracker), tracker.consumed()
        return {
            "loader": _STATE_NAME,
            "version": _STATE_VERSION,
            "sampler": sampler_state,
            "batches_consumed_in_pass": consumed,
            "units_per_batch": self._batch_units,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; the next iterator starts exactly after the consumed batches.

        The position is counted in sampler units (indices or batches), so a different
        ``batch_size`` or world size continues the same epoch without repeats or gaps.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"ResumableDataLoader.load_state_dict expects a dict, got {type(state).__name__}")
        if state.get("loader") != _STATE_NAME or "sampler" not in state:
            raise ValueError(
                "ResumableDataLoader.load_state_dict: not a ResumableDataLoader state (needs keys "
                f"'loader' == {_STATE_NAME!r} and 'sampler'), got keys {sorted(state)}"
            )
        self._resumable.load_state_dict(state["sampler"])
        sampler_state = state["sampler"]
        here = self._resumable.bookmark()
        saved_units = state.get("units_per_batch")
        units = saved_units if isinstance(saved_units, int) and saved_units > 0 else self._batch_units
        self._loaded = (here.epoch, here.position, sampler_state.get("num_replicas"), units)
        self._tracker = None
        self._idle_state = None
