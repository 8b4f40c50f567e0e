"""ResumableDataLoader: unit tests and end-to-end Lightning resume parity (single device).

End-to-end pattern: one uninterrupted ``Trainer.fit`` per configuration records the indices the
model trained on and writes a checkpoint every step (``ModelCheckpoint(every_n_train_steps)``,
mid-epoch and at the epoch boundary); resuming from each checkpoint must train on exactly the
rest of the uninterrupted sequence.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, IterableDataset
from torch.utils.data import RandomSampler as TorchRandomSampler

sys.path.insert(0, str(Path(__file__).parent / "samplers_scripts"))

import samplers_harness as H

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
        assert loader.sampler.state_dict()["position"] > 12  # the sampler ran ahead with the workers (V3) ...
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
    assert loader.sampler is loader.batch_sampler  # Lightning sees a DistributedSampler (V7)

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
    # Lightning creates the iterator, then calls set_epoch (#21938): the lazy iterator sees it.
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
    ("random_nolen", 0, "ckpt"),  # no length: Lightning prefetches one batch (V5)
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
                plugins=H.plugins_for(fmt),
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
        _, rest = H.fit(
            lambda: H.make_loader(kind, num_workers), root, ckpt_path=path, max_epochs=2, plugins=H.plugins_for(fmt)
        )
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
        plugins=H.plugins_for(fmt),
    )
    assert part == full[3:5]
    _, rest = H.fit(
        lambda: H.make_loader(kind),
        root,
        ckpt_path=H.ckpt_for_step(second_dir, 4, fmt),
        max_epochs=2,
        plugins=H.plugins_for(fmt),
    )
    assert full[3:4] + rest == full[3:]


def test_save_checkpoint_after_fit_keeps_the_position_and_lightning_starts_the_next_epoch(uninterrupted, tmp_path):
    """V6. The loader keeps its position after ``fit`` returns, but Lightning itself counts the
    stopped epoch as completed (``fit_loop.epoch_progress``) and on resume calls
    ``set_epoch(next)``, so training continues with the next epoch's full order."""
    root, _, full = uninterrupted("random", 0)
    trainer, part = H.fit(lambda: H.make_loader("random"), str(tmp_path), max_epochs=2, max_steps=4)
    assert part == full[:4]
    path = str(tmp_path / "after_fit.ckpt")
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    saved = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert saved["sampler"]["epoch"] == 0 and saved["sampler"]["position"] == 16  # position kept
    assert ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1  # Lightning: epoch done
    _, rest = H.fit(lambda: H.make_loader("random"), str(tmp_path), ckpt_path=path, max_epochs=2)
    assert rest == full[len(full) // 2 :]


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
    """Lightning #20550: the stashed loader state is never loaded; the lazy iterator loads it."""
    root, ckpt_dir, _ = uninterrupted("random", 0)
    full_model = _EstimatingModel()
    H.make_trainer(str(tmp_path), max_epochs=2).fit(full_model, train_dataloaders=H.make_loader("random"))
    model = _EstimatingModel()
    trainer = H.make_trainer(str(tmp_path), max_epochs=2)
    with pytest.warns(UserWarning, match="#20550"):
        trainer.fit(model, train_dataloaders=H.make_loader("random"), ckpt_path=H.ckpt_for_step(ckpt_dir, 3))
    assert model.seen == full_model.seen[3:]


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
    """#20550 with no length: Lightning prefetched a batch before the (skipped) restore; too late."""
    _, ckpt_dir, _ = uninterrupted("random_nolen", 0)
    trainer = H.make_trainer(str(tmp_path), max_epochs=2)
    with pytest.raises(RuntimeError, match="20550"):
        trainer.fit(
            _EstimatingModel(), train_dataloaders=H.make_loader("random_nolen"), ckpt_path=H.ckpt_for_step(ckpt_dir, 3)
        )
