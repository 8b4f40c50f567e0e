"""Review regressions for ResumableDataLoader inside Lightning: evaluation loaders, CombinedLoader
cycling, loaders without a length after ``fit`` returns, gradient accumulation, a loader used
for both training and validation."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader

sys.path.insert(0, str(Path(__file__).parent / "samplers_scripts"))

import samplers_harness as H

from lightning_utils.data.loader import ResumableDataLoader
from lightning_utils.data.samplers import OrderedSampler, RandomSampler

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class _ValRecordingModel(H.RecordingModel):
    def __init__(self) -> None:
        super().__init__()
        self.val_runs: list[list[list[int]]] = []

    def on_validation_epoch_start(self) -> None:
        self.val_runs.append([])

    def validation_step(self, batch, batch_idx):
        self.val_runs[-1].append(batch.tolist())


def _trainer(root, **kw):
    kw.setdefault("max_epochs", 2)
    return L.Trainer(
        default_root_dir=str(root), logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["ordered", "random"])
def test_every_validation_run_sees_the_whole_epoch_from_its_start(tmp_path, kind):
    """A sanity check (2 batches) or limit_val_batches must not make the next validation run
    continue where the previous one stopped: each run starts the epoch afresh, like a DataLoader."""

    def sampler():
        return OrderedSampler(10) if kind == "ordered" else RandomSampler(10, seed=1)

    model = _ValRecordingModel()
    val = ResumableDataLoader(H.IndexDataset(10), batch_size=2, sampler=sampler())
    trainer = _trainer(
        tmp_path, enable_checkpointing=False, num_sanity_val_steps=2, val_check_interval=0.5, limit_val_batches=3
    )
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
    """V5 + V6: Lightning prefetched one batch it never trained on and then freed its fetcher."""
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
        trainer = _trainer(
            tmp_path,
            callbacks=callbacks or [],
            enable_checkpointing=bool(callbacks),
            num_sanity_val_steps=2,
            val_check_interval=3,
            limit_val_batches=2,
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
        trainer = _trainer(
            tmp_path, callbacks=callbacks or [], enable_checkpointing=bool(callbacks), num_sanity_val_steps=0,
            val_check_interval=val_check_interval,
        )  # fmt: skip
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
    """V6 with the endless PoolSampler: Lightning starts a new epoch, the bag goes on (not from draw 0)."""
    _, full = H.fit(lambda: H.make_loader("pool"), str(tmp_path), max_epochs=2)
    trainer, part = H.fit(lambda: H.make_loader("pool"), str(tmp_path), max_epochs=2, max_steps=4)
    assert part == full[:4]
    path = str(tmp_path / "after_fit.ckpt")
    trainer.save_checkpoint(path)
    _, rest = H.fit(lambda: H.make_loader("pool"), str(tmp_path), ckpt_path=path, max_epochs=2)
    assert rest == full[4 : 4 + len(rest)] and len(rest) == len(full) // 2


def test_resume_mid_epoch_on_more_ranks_fails_loudly_instead_of_skipping(tmp_path):
    """1 rank -> 2 ranks mid-epoch: Lightning keeps its count of batches done (of 6 per epoch) and
    ends the epoch at the new length (3 per rank), which would skip samples. A single process
    with an explicit rank 0 of 2 shows what each DDP rank would do."""
    ckpt_dir = str(tmp_path / "ckpt")
    _, full = H.fit(
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
