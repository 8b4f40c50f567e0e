"""ResumableDataLoader: plain loops, and exact resume inside Lightning on one device.

End-to-end pattern: one uninterrupted ``Trainer.fit`` per configuration records the indices the
model trained on and writes a checkpoint every step (``ModelCheckpoint(every_n_train_steps)``,
mid-epoch and at the epoch boundary); resuming from each checkpoint must train on exactly the
rest of the uninterrupted sequence. Also: evaluation loaders, ``CombinedLoader`` cycling,
checkpoints written at an epoch's end or after ``fit``, gradient accumulation, a changed world
size, and the stack walk that finds Lightning's loop and fetcher. The 2-rank DDP runs are in
``test_loader_ddp.py``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import BatchSampler, IterableDataset
from torch.utils.data import RandomSampler as TorchRandomSampler

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

import loader_harness as H

from lightning_utils.data.loader import ResumableDataLoader
from lightning_utils.data.samplers import BatchedOrderedSampler, OrderedSampler, PoolSampler, RandomSampler

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def batches(it, k=None):
    out = []
    for b in it:
        out.append(b.tolist())
        if k is not None and len(out) == k:
            break
    return out


# -- plain loops --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_in_a_plain_loop_counts_consumed_batches_not_prefetched(num_workers):
    def make():
        return ResumableDataLoader(
            H.IndexDataset(), batch_size=4, sampler=RandomSampler(22, seed=3), num_workers=num_workers
        )

    reference = make()
    full = batches(reference) + batches(reference)
    loader = make()
    it = iter(loader)
    head = [next(it).tolist() for _ in range(3)]
    if num_workers:
        assert loader.sampler.state_dict()["position"] > 12  # the sampler ran ahead with the workers ...
    state = loader.state_dict()
    assert state["sampler"]["position"] == 12  # ... the loader counts what was consumed
    del it
    resumed = make()
    resumed.load_state_dict(state)
    assert head + batches(resumed) + batches(resumed) == full


@pytest.mark.parametrize(("num_workers", "persistent"), [(0, False), (2, True)])
def test_new_pass_continues_after_an_abandoned_one(num_workers, persistent):
    def make():
        return ResumableDataLoader(
            H.IndexDataset(), batch_size=4, sampler=PoolSampler(range(22), seed=1),
            num_workers=num_workers, persistent_workers=persistent,
        )  # fmt: skip

    expected = batches(make(), 12)
    loader = make()
    got = batches(loader, 3) + batches(loader, 3) + batches(loader, 3)  # three loops, each breaking early
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    assert got + batches(resumed, 3) == expected  # no marble lost between passes or across a restore


def test_batch_sampler_forms_and_loader_drop_last():
    buckets = {k: [("x", float(k))] * 3 for k in range(1, 7)}

    def batched():
        return BatchedOrderedSampler(buckets, max_duration=8, max_batch_size=3, shuffle=True, seed=2)

    reference = ResumableDataLoader(H.IndexDataset(18), batch_sampler=batched())
    full = batches(reference) + batches(reference)
    loader = ResumableDataLoader(H.IndexDataset(18), batch_sampler=batched())
    head = batches(loader, 4)
    resumed = ResumableDataLoader(H.IndexDataset(18), batch_sampler=batched())
    resumed.load_state_dict(loader.state_dict())
    assert head + batches(resumed) + batches(resumed) == full
    assert loader.sampler is loader.batch_sampler  # Lightning sees a DistributedSampler and keeps it

    # a torch BatchSampler over one of our samplers, with drop_last: the dropped tail ends the epoch
    def wrapped():
        return ResumableDataLoader(H.IndexDataset(), batch_sampler=BatchSampler(OrderedSampler(22), 4, drop_last=True))

    first = wrapped()
    assert batches(first) == [[i, i + 1, i + 2, i + 3] for i in range(0, 20, 4)]
    state = first.state_dict()
    again = wrapped()
    again.load_state_dict(state)
    assert batches(again, 1) == [[0, 1, 2, 3]]  # next epoch, not the 2 left-over items


def test_default_samplers_and_batch_size_change():
    loader = ResumableDataLoader(
        H.IndexDataset(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5)
    )
    assert isinstance(loader.sampler, RandomSampler) and loader.sampler.seed == 5
    head = batches(loader, 2)
    bigger = ResumableDataLoader(
        H.IndexDataset(), batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(5)
    )
    bigger.load_state_dict(loader.state_dict())  # positions count samples: another batch size continues
    rest = [i for b in batches(bigger) for i in b]
    assert sorted([i for b in head for i in b] + rest) == list(range(22))
    assert isinstance(ResumableDataLoader(H.IndexDataset()).sampler, OrderedSampler)


def test_set_epoch_between_iter_and_first_batch_is_honoured():
    # Lightning creates the iterator, then calls set_epoch: the lazy iterator sees it.
    loader = ResumableDataLoader(H.IndexDataset(), batch_size=4, sampler=RandomSampler(22, seed=3), num_workers=0)
    it = iter(loader)
    loader.sampler.set_epoch(4)
    first = next(it).tolist()
    assert first == list(RandomSampler(22, seed=3).permutation(4).take(torch.arange(4)).tolist())


def test_rejected_configurations():
    with pytest.raises(TypeError, match="`sampler` must be a lightning_utils"):
        ResumableDataLoader(H.IndexDataset(), sampler=TorchRandomSampler(range(5)))
    with pytest.raises(TypeError, match="`batch_sampler` must be"):
        ResumableDataLoader(H.IndexDataset(), batch_sampler=BatchSampler(TorchRandomSampler(range(5)), 2, False))

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(TypeError, match="IterableDataset"):
        ResumableDataLoader(Stream())
    with pytest.raises(ValueError, match="in_order=False"):
        ResumableDataLoader(H.IndexDataset(), num_workers=2, in_order=False)
    loader = ResumableDataLoader(H.IndexDataset(), batch_size=2)
    with pytest.raises(ValueError, match="not a ResumableDataLoader state"):
        loader.load_state_dict({"sampler": {}})
    with pytest.raises(ValueError, match="expects a dict"):
        loader.load_state_dict(3)
    with pytest.raises(ValueError, match="length=23 but this sampler was built with length=22"):
        loader.load_state_dict(ResumableDataLoader(H.IndexDataset(23), batch_size=2).state_dict())


# -- Lightning end to end -------------------------------------------------------------------------

CASES = [
    ("ordered", 0, "ckpt"),
    ("random", 0, "ckpt"),
    ("pool", 0, "ckpt"),
    ("batched", 0, "ckpt"),
    ("default_shuffle", 0, "ckpt"),
    ("random_nolen", 0, "ckpt"),  # no length: Lightning prefetches one batch
    ("random", 2, "ckpt"),
    ("batched", 2, "ckpt"),
    # whole-state safetensors checkpoints through SafetensorsCheckpointIO
    ("ordered", 0, "sft"),
    ("random", 0, "sft"),
    ("pool", 0, "sft"),
    ("batched", 0, "sft"),
    ("random_nolen", 0, "sft"),
    ("random", 2, "sft"),
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One full 2-epoch run per case, checkpointing every step; cached for the module."""
    cache = {}

    def get(kind, num_workers, fmt="ckpt"):
        key = (kind, num_workers, fmt)
        if key not in cache:
            root = str(tmp_path_factory.mktemp(f"{kind}-{num_workers}-{fmt}"))
            ckpt_dir = os.path.join(root, "ckpt")
            _, seen = H.fit(
                lambda: H.make_loader(kind, num_workers),
                root,
                callbacks=[H.every_n_steps_checkpoint(ckpt_dir, 1, fmt)],
                max_epochs=2,
                fmt=fmt,
            )
            cache[key] = (root, ckpt_dir, seen)
        return cache[key]

    return get


@pytest.mark.parametrize(("kind", "num_workers", "fmt"), CASES, ids=[f"{k}-w{w}-{f}" for k, w, f in CASES])
def test_lightning_resume_matches_uninterrupted(uninterrupted, kind, num_workers, fmt):
    root, ckpt_dir, full = uninterrupted(kind, num_workers, fmt)
    steps_per_epoch = len(full) // 2
    resume_steps = [3, steps_per_epoch] if num_workers else [3, steps_per_epoch, steps_per_epoch + 2]
    assert steps_per_epoch in resume_steps and steps_per_epoch > 3  # a mid-epoch and the boundary
    for step in resume_steps:
        path = H.ckpt_for_step(ckpt_dir, step, fmt)
        saved = H.load_checkpoint_file(path)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
        assert saved["loader"] == "ResumableDataLoader"
        assert isinstance(saved["sampler"]["position"], int)
        _, rest = H.fit(lambda: H.make_loader(kind, num_workers), root, ckpt_path=path, max_epochs=2, fmt=fmt)
        assert rest == full[step:], f"resume from step {step}"


@pytest.mark.parametrize(("kind", "fmt"), [("random", "ckpt"), ("batched", "ckpt"), ("random", "sft")])
def test_lightning_resume_twice_in_one_epoch(uninterrupted, tmp_path, kind, fmt):
    root, ckpt_dir, full = uninterrupted(kind, 0, fmt)
    second_dir = str(tmp_path / "second")
    _, part = H.fit(
        lambda: H.make_loader(kind),
        root,
        ckpt_path=H.ckpt_for_step(ckpt_dir, 3, fmt),
        callbacks=[H.every_n_steps_checkpoint(second_dir, 2, fmt)],
        max_epochs=2,
        max_steps=5,
        fmt=fmt,
    )
    assert part == full[3:5]
    _, rest = H.fit(
        lambda: H.make_loader(kind),
        root,
        ckpt_path=H.ckpt_for_step(second_dir, 4, fmt),
        max_epochs=2,
        fmt=fmt,
    )
    assert full[3:4] + rest == full[3:]


@pytest.mark.parametrize("resume_with", ["max_epochs", "max_steps"])
@pytest.mark.parametrize("kind", ["random", "random_nolen", "batched"])
def test_save_checkpoint_after_fit_stopped_mid_epoch_resumes_exactly(tmp_path, kind, resume_with):
    """``max_steps`` stops fit in the middle of an epoch; Lightning then counts that epoch as done
    (``fit_loop.epoch_progress``), so a checkpoint written after ``fit`` returns says "epoch 0
    finished" while the loader says "16 of 22 samples of epoch 0". Resuming it (training N more
    steps, or to the end) continues epoch 0 exactly: same samples, same losses."""
    full_trainer, full = H.fit_model(lambda: H.make_loader(kind), str(tmp_path / "full"), max_epochs=2)
    trainer, part = H.fit_model(lambda: H.make_loader(kind), str(tmp_path), max_epochs=2, max_steps=4)
    assert part.seen == full.seen[:4]
    path = str(tmp_path / "after_fit.ckpt")
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1  # Lightning: epoch done
    limit = {"max_steps": 8} if resume_with == "max_steps" else {}
    resumed_trainer, rest = H.fit_model(
        lambda: H.make_loader(kind), str(tmp_path), ckpt_path=path, max_epochs=2, **limit
    )
    end = 8 if resume_with == "max_steps" else len(full.seen)
    assert rest.seen == full.seen[4:end]
    assert rest.losses == pytest.approx(full.losses[4:end], rel=1e-6, abs=0)
    if resume_with == "max_epochs":  # the epochs are Lightning's as well: the same count, the same end
        assert resumed_trainer.current_epoch == full_trainer.current_epoch == 2


@pytest.mark.parametrize("fmt", ["ckpt", "sft"])
def test_end_of_epoch_checkpoint_of_an_epoch_cut_short_by_max_steps_resumes_exactly(tmp_path, fmt):
    """ModelCheckpoint's default save at ``on_train_epoch_end`` also runs when ``max_steps`` ends
    the epoch early; the file says the epoch was processed. Extending the run resumes exactly."""
    _, full = H.fit_model(lambda: H.make_loader("random"), str(tmp_path / "full"), max_epochs=2, max_steps=8, fmt=fmt)
    ckpt_dir = str(tmp_path / "ckpt")
    H.fit(
        lambda: H.make_loader("random"),
        str(tmp_path),
        callbacks=[H.epoch_end_checkpoint(ckpt_dir, fmt)],
        max_steps=4,
        fmt=fmt,
    )
    _, rest = H.fit_model(
        lambda: H.make_loader("random"),
        str(tmp_path),
        ckpt_path=H.ckpt_for_step(ckpt_dir, 4, fmt),
        max_steps=8,
        fmt=fmt,
    )
    assert rest.seen == full.seen[4:8]
    assert rest.losses == pytest.approx(full.losses[4:8], rel=1e-6, abs=0)


@pytest.mark.parametrize("kind", ["random", "pool"])
def test_lightning_resume_with_limit_train_batches(tmp_path, kind):
    """Truncated epochs: RandomSampler starts each Lightning epoch afresh (set_epoch), the endless
    PoolSampler continues its bag; either way a resume matches the uninterrupted run."""
    ckpt_dir = str(tmp_path / "ckpt")
    kw = {"max_epochs": 3, "limit_train_batches": 3}
    _, full = H.fit(
        lambda: H.make_loader(kind), str(tmp_path), callbacks=[H.every_n_steps_checkpoint(ckpt_dir, 1)], **kw
    )
    for step in (2, 3, 4):
        _, rest = H.fit(lambda: H.make_loader(kind), str(tmp_path), ckpt_path=H.ckpt_for_step(ckpt_dir, step), **kw)
        assert rest == full[step:], f"resume from step {step}"


class _EstimatingModel(H.RecordingModel):
    def configure_optimizers(self):
        self.trainer.estimated_stepping_batches  # noqa: B018 -- makes Lightning build the loader early
        return super().configure_optimizers()


def test_lightning_resume_survives_estimated_stepping_batches(uninterrupted, tmp_path):
    """``estimated_stepping_batches`` in ``configure_optimizers`` makes Lightning build the loader
    before restoring the checkpoint, and then it never loads the stashed loader state; the lazy
    iterator loads it (with a warning that cites the Lightning issue)."""
    _, ckpt_dir, _ = uninterrupted("random", 0)
    full_model = _EstimatingModel()
    H.make_trainer(str(tmp_path), max_epochs=2).fit(full_model, train_dataloaders=H.make_loader("random"))
    model = _EstimatingModel()
    trainer = H.make_trainer(str(tmp_path), max_epochs=2)
    with pytest.warns(UserWarning, match="#20550"):
        trainer.fit(model, train_dataloaders=H.make_loader("random"), ckpt_path=H.ckpt_for_step(ckpt_dir, 3))
    assert model.seen == full_model.seen[3:]


def test_estimated_stepping_batches_with_a_checkpoint_of_an_epoch_cut_short_warns(tmp_path):
    """Lightning built the loader before restoring (#20550), so nothing runs between its restore
    and its restart to give it the cut-short epoch back: the skipped samples are reported."""
    trainer, _ = H.fit(lambda: H.make_loader("random"), str(tmp_path), max_epochs=2, max_steps=4)
    path = str(tmp_path / "after_fit.ckpt")
    trainer.save_checkpoint(path)
    model = _EstimatingModel()
    with pytest.warns(UserWarning, match="rest of epoch 0 is skipped"):
        H.make_trainer(str(tmp_path), max_epochs=2).fit(
            model, train_dataloaders=H.make_loader("random"), ckpt_path=path
        )
    assert len(model.seen) == 6  # epoch 1 only


class _PredictingModel(H.RecordingModel):
    def predict_step(self, batch, batch_idx):
        return batch


@pytest.mark.parametrize("kind", ["ordered", "batched"])
def test_lightning_predict_reinstantiates_the_loader(tmp_path, kind):
    """Lightning rebuilds every predict loader (``_update_dataloader``); ours survives that."""
    trainer = H.make_trainer(str(tmp_path))
    out = trainer.predict(_PredictingModel(), dataloaders=H.make_loader(kind))
    assert isinstance(trainer.predict_dataloaders, ResumableDataLoader)
    flat = sorted(i for b in out for i in b.tolist())
    assert flat == list(range(22))


def test_estimated_stepping_batches_with_a_lengthless_loader_fails_loudly(uninterrupted, tmp_path):
    """The same without a length: Lightning prefetched a batch before the skipped restore; too late."""
    _, ckpt_dir, _ = uninterrupted("random_nolen", 0)
    trainer = H.make_trainer(str(tmp_path), max_epochs=2)
    with pytest.raises(RuntimeError, match="20550"):
        trainer.fit(
            _EstimatingModel(), train_dataloaders=H.make_loader("random_nolen"), ckpt_path=H.ckpt_for_step(ckpt_dir, 3)
        )


# -- evaluation loaders, CombinedLoader, end-of-epoch and after-fit checkpoints ------------------


class _ValRecordingModel(H.RecordingModel):
    def __init__(self) -> None:
        super().__init__()
        self.val_runs: list[list[list[int]]] = []

    def on_validation_epoch_start(self) -> None:
        self.val_runs.append([])

    def validation_step(self, batch, batch_idx):
        self.val_runs[-1].append(batch.tolist())


@pytest.mark.parametrize("kind", ["ordered", "random"])
def test_every_validation_run_sees_the_whole_epoch_from_its_start(tmp_path, kind):
    """A sanity check (2 batches) or limit_val_batches must not make the next validation run
    continue where the previous one stopped: each run starts the epoch afresh, like a DataLoader."""

    def sampler():
        return OrderedSampler(10) if kind == "ordered" else RandomSampler(10, seed=1)

    model = _ValRecordingModel()
    val = ResumableDataLoader(H.IndexDataset(10), batch_size=2, sampler=sampler())
    trainer = H.make_trainer(tmp_path, num_sanity_val_steps=2, val_check_interval=0.5, limit_val_batches=3)
    trainer.fit(model, train_dataloaders=H.make_loader("ordered"), val_dataloaders=val)
    assert len(model.val_runs) == 5  # the sanity check, then two per epoch
    for run, epoch in zip(model.val_runs, [0, 0, 0, 1, 1]):
        # Lightning calls set_epoch(current epoch) on validation samplers before each run
        reference = sampler()
        reference.set_epoch(epoch)
        expected = [b.tolist() for b in ResumableDataLoader(H.IndexDataset(10), batch_size=2, sampler=reference)]
        assert run == expected[: len(run)] and len(run) == (2 if run is model.val_runs[0] else 3)


def _combined(mode):
    a = ResumableDataLoader(H.IndexDataset(22), batch_size=4, sampler=RandomSampler(22, seed=1))  # 6 batches
    b = ResumableDataLoader(H.IndexDataset(10), batch_size=4, sampler=RandomSampler(10, seed=2))  # 3, cycled
    return CombinedLoader({"a": a, "b": b}, mode=mode)


class _DictModel(H.RecordingModel):
    def training_step(self, batch, batch_idx):
        self.seen.append({k: v.tolist() for k, v in batch.items()})
        return self.layer(batch["a"].float().view(-1, 1)).pow(2).mean()


def test_combined_loader_cycling_a_short_loader_resumes_exactly(tmp_path):
    """max_size_cycle re-iterates the short loader within one epoch, so its sampler rolls over into
    its next epoch; Lightning's set_epoch(same epoch) on resume must not send it back."""
    ckpt_dir = str(tmp_path / "ckpt")
    full_model = _DictModel()
    H.make_trainer(str(tmp_path), callbacks=[H.every_n_steps_checkpoint(ckpt_dir, 1)]).fit(
        full_model, train_dataloaders=_combined("max_size_cycle")
    )
    full = full_model.seen
    assert len(full) == 12
    for step in (2, 4, 5, 6, 8):
        model = _DictModel()
        H.make_trainer(str(tmp_path)).fit(
            model, train_dataloaders=_combined("max_size_cycle"), ckpt_path=H.ckpt_for_step(ckpt_dir, step)
        )
        assert model.seen == full[step:], f"resume from step {step}"


def test_save_checkpoint_after_fit_without_a_length_counts_the_prefetched_batch_out(tmp_path):
    """Lightning prefetched one batch it never trained on (no length) and then freed its fetcher."""
    trainer, part = H.fit(lambda: H.make_loader("random_nolen"), str(tmp_path), max_epochs=2, max_steps=4)
    assert len(part) == 4
    path = str(tmp_path / "after_fit.ckpt")
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert saved["sampler"]["position"] == 16 and saved["batches_consumed_in_pass"] == 4


@pytest.mark.parametrize(("kind", "num_workers"), [("random", 0), ("random_nolen", 2)])
def test_gradient_accumulation_resume_matches_uninterrupted(tmp_path, kind, num_workers):
    ckpt_dir = str(tmp_path / "ckpt")
    kw = {"max_epochs": 2, "accumulate_grad_batches": 2}
    _, full = H.fit(
        lambda: H.make_loader(kind, num_workers),
        str(tmp_path),
        callbacks=[H.every_n_steps_checkpoint(ckpt_dir, 1)],
        **kw,
    )
    for step in (1, 3):  # optimizer steps: 2 and 6 micro-batches in, mid-epoch and in epoch 1
        _, rest = H.fit(
            lambda: H.make_loader(kind, num_workers), str(tmp_path), ckpt_path=H.ckpt_for_step(ckpt_dir, step), **kw
        )
        assert rest == full[2 * step :], f"resume from optimizer step {step}"


def test_one_loader_for_training_and_validation_keeps_the_training_position(tmp_path):
    """The same loader object as train and val loader: validation runs (sanity check and
    mid-epoch) neither move nor replace the training position that the checkpoint stores."""
    ckpt_dir = str(tmp_path / "ckpt")

    def run(ckpt_path=None, callbacks=None):
        model = _ValRecordingModel()
        loader = H.make_loader("random")
        trainer = H.make_trainer(
            tmp_path, callbacks=callbacks, num_sanity_val_steps=2, val_check_interval=3, limit_val_batches=2
        )
        trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader, ckpt_path=ckpt_path)
        return model

    full = run(callbacks=[H.every_n_steps_checkpoint(ckpt_dir, 1)])
    assert full.seen[:6] == [b.tolist() for b in H.make_loader("random")][:6]  # the sanity check moved nothing
    for step in (2, 4, 7):
        resumed = run(ckpt_path=H.ckpt_for_step(ckpt_dir, step))
        assert resumed.seen == full.seen[step:], f"resume from step {step}"


def test_a_lightning_loop_without_a_recognisable_fetcher_warns(tmp_path, monkeypatch):
    """The stack walk must not silently miss Lightning's fetcher (it would mis-position a loader
    without a length): simulate renamed internals and expect a loud warning."""
    import lightning.pytorch.loops.fetchers as fetchers

    class Renamed:
        pass

    monkeypatch.setattr(fetchers, "_PrefetchDataFetcher", Renamed)
    monkeypatch.setattr(fetchers, "_DataFetcher", Renamed)
    with pytest.warns(RuntimeWarning, match="no Lightning data fetcher was found"):
        H.fit(lambda: H.make_loader("random_nolen"), str(tmp_path), max_epochs=1, max_steps=2)


def test_iter_from_a_bare_thread_does_not_crash(monkeypatch):
    """``iter(loader)`` as a thread's entry point has no Python caller frame to walk."""
    import _thread
    import threading

    loader = ResumableDataLoader(H.IndexDataset(6), batch_size=2, sampler=OrderedSampler(6))
    errors, done = [], threading.Event()
    monkeypatch.setattr(sys, "unraisablehook", lambda u: errors.append(u.exc_value))

    class Done:  # runs after the iterator was created (and is freed in the thread)
        def __del__(self):
            done.set()

    _thread.start_new_thread(loader.__iter__, ())  # bound method: no Python frame above __iter__
    _thread.start_new_thread(lambda d: None, (Done(),))
    assert done.wait(10)
    threading.Event().wait(0.2)
    assert not errors, errors
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5]]


class _LoggingValModel(H.RecordingModel):
    def validation_step(self, batch, batch_idx):
        self.log("v", batch.float().mean())


@pytest.mark.parametrize("kind", ["random_nolen", "random"])
@pytest.mark.parametrize("val_check_interval", [1.0, 3])
def test_resume_from_a_checkpoint_written_at_validation_end_of_the_last_batch(tmp_path, kind, val_check_interval):
    """ModelCheckpoint(monitor=...) saves when a validation ends, here after the epoch's last batch.
    With val_check_interval=1.0 Lightning counts the epoch as done and never applies the loader
    state; with 3 it resumes the epoch, prefetches a batch (no length: it cannot know the epoch
    is over), drops it and starts the next epoch: that batch must not count as trained on."""
    ckpt_dir = str(tmp_path / "ckpt")

    def run(ckpt_path=None, callbacks=None):
        model = _LoggingValModel()
        val = ResumableDataLoader(H.IndexDataset(6), batch_size=2, sampler=OrderedSampler(6))
        trainer = H.make_trainer(tmp_path, callbacks=callbacks, val_check_interval=val_check_interval)
        trainer.fit(model, train_dataloaders=H.make_loader(kind), val_dataloaders=val, ckpt_path=ckpt_path)
        return model.seen

    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, monitor="v", save_top_k=-1, filename="{step}")
    full = run(callbacks=[checkpoint])
    assert len(full) == 12 and "step=6.ckpt" in os.listdir(ckpt_dir)
    assert run(ckpt_path=os.path.join(ckpt_dir, "step=6.ckpt")) == full[6:]


@pytest.mark.parametrize("kind", ["pool", "random_nolen", "batched"])
def test_resume_from_the_default_end_of_epoch_checkpoint(tmp_path, kind):
    """ModelCheckpoint's default save at on_train_epoch_end: Lightning counts the epoch as done, is
    "not restarting" and never applies the loader states. The loader applies them itself: the
    endless bag continues instead of starting again, a loader without a length trains the next
    epoch's order."""
    ckpt_dir = str(tmp_path / "ckpt")
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, filename="{step}")
    _, full = H.fit(lambda: H.make_loader(kind), str(tmp_path), callbacks=[checkpoint], max_epochs=2)
    first = sorted(os.listdir(ckpt_dir), key=lambda f: int(f.split("=")[1].split(".")[0]))[0]
    step = int(first.split("=")[1].split(".")[0])
    assert step == len(full) // 2
    _, rest = H.fit(lambda: H.make_loader(kind), str(tmp_path), ckpt_path=os.path.join(ckpt_dir, first), max_epochs=2)
    assert rest == full[step:]


def test_save_checkpoint_after_fit_continues_the_pool_bag(tmp_path):
    """After ``fit`` stopped mid-epoch with the endless PoolSampler: the resumed run finishes
    Lightning's epoch and the bag goes on (not from draw 0), exactly as without the stop."""
    _, full = H.fit(lambda: H.make_loader("pool"), str(tmp_path), max_epochs=2)
    trainer, part = H.fit(lambda: H.make_loader("pool"), str(tmp_path), max_epochs=2, max_steps=4)
    assert part == full[:4]
    path = str(tmp_path / "after_fit.ckpt")
    trainer.save_checkpoint(path)
    _, rest = H.fit(lambda: H.make_loader("pool"), str(tmp_path), ckpt_path=path, max_epochs=2)
    assert rest == full[4:]


def test_resume_mid_epoch_on_more_ranks_with_the_same_global_batch_continues_the_epoch(tmp_path):
    """1 rank of batch 4 -> 2 ranks of batch 2: the global batch and so the number of batches per
    epoch are unchanged, Lightning's restored count of batches done stays right, and the two ranks
    together train exactly the rest of the epoch."""
    from lightning_utils.data import RandomSampler

    def loader(batch_size: int, **replicas):
        ds = H.IndexDataset()
        return ResumableDataLoader(ds, batch_size=batch_size, sampler=RandomSampler(len(ds), seed=7, **replicas))

    ckpt_dir = str(tmp_path / "ckpt")
    _, first = H.fit(
        lambda: loader(H.BATCH_SIZE), str(tmp_path), callbacks=[H.every_n_steps_checkpoint(ckpt_dir, 1)], max_epochs=1
    )
    rest = []
    for rank in range(2):
        _, seen = H.fit(
            lambda rank=rank: loader(H.BATCH_SIZE // 2, num_replicas=2, rank=rank),
            str(tmp_path / f"rank{rank}"),
            ckpt_path=H.ckpt_for_step(ckpt_dir, 2),
            max_epochs=1,
        )
        assert len(seen) == len(first) - 2  # the epoch's remaining batches, on each rank
        rest += [i for batch in seen for i in batch]
    done = [i for batch in first[:2] for i in batch]
    assert sorted(done + rest) == list(range(H.N_ITEMS))


def test_resume_mid_epoch_on_more_ranks_fails_loudly_instead_of_skipping(tmp_path):
    """1 rank -> 2 ranks mid-epoch: Lightning keeps its count of batches done (of 6 per epoch) and
    ends the epoch at the new length (3 per rank), which would skip samples. A single process
    with an explicit rank 0 of 2 shows what each DDP rank would do."""
    ckpt_dir = str(tmp_path / "ckpt")
    H.fit(
        lambda: H.make_loader("random"),
        str(tmp_path),
        callbacks=[H.every_n_steps_checkpoint(ckpt_dir, 1)],
        max_epochs=2,
    )
    with pytest.raises(RuntimeError, match="written mid-epoch with 1 rank"):
        H.fit(
            lambda: H.make_loader("random", num_replicas=2, rank=0),
            str(tmp_path),
            ckpt_path=H.ckpt_for_step(ckpt_dir, 2),
            max_epochs=2,
        )
    with pytest.raises(RuntimeError, match="moved on to epoch 1|would end the epoch"):
        H.fit(
            lambda: H.make_loader("random", num_replicas=2, rank=0),
            str(tmp_path),
            ckpt_path=H.ckpt_for_step(ckpt_dir, 4),
            max_epochs=2,
        )
    # at the epoch boundary another world size is fine: epoch 1 starts in full on the 2 ranks
    _, rest = H.fit(
        lambda: H.make_loader("random", num_replicas=2, rank=0),
        str(tmp_path),
        ckpt_path=H.ckpt_for_step(ckpt_dir, 6),
        max_epochs=2,
    )
    reference = H.make_loader("random", num_replicas=2, rank=0)
    reference.sampler.set_epoch(1)
    assert rest == [b.tolist() for b in reference]
