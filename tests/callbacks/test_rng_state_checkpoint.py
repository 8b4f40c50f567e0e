"""RNGStateCheckpoint: a resumed run draws the same random numbers as the uninterrupted one."""

from __future__ import annotations

import math
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers.lightning import cpu_trainer
from helpers.ranks import run_launcher
from lightning.pytorch.callbacks import Callback

from lightning_utils.callbacks import RNGStateCheckpoint, SafetensorsModelCheckpoint
from lightning_utils.callbacks.rng_state_checkpoint import _apply, _collect
from lightning_utils.io import load_state
from lightning_utils.plugins import SafetensorsCheckpointIO


class NoisyModule(pl.LightningModule):
    """Dropout plus Python/NumPy noise in the loss: every RNG matters."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x = torch.full((8, 4), float(self.global_step))
        jitter = random.random() + float(np.random.rand())
        return self.net(x).pow(2).mean() + jitter

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)  # 8 steps per epoch

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


class AugmentedData(torch.utils.data.Dataset):
    """A random "augmentation" drawn in the main process (num_workers=0) for every sample."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(1)


class NoisyDataModule(NoisyModule):
    """The batch itself (random per sample) enters the loss, so batch contents matter too."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + batch.sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(AugmentedData(), batch_size=1)


class UnsizedData(torch.utils.data.IterableDataset):
    """No ``__len__``: Lightning prefetches one batch ahead; every sample is random."""

    def __iter__(self):
        while True:
            yield torch.rand(1)


class NoisyUnsizedModule(NoisyDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(UnsizedData(), batch_size=1)


def _run(tmp, max_steps, callbacks, ckpt_path=None, module=NoisyModule, **kwargs):
    pl.seed_everything(7)
    losses = Losses()
    t = cpu_trainer(
        tmp, max_steps=max_steps, callbacks=[losses, *callbacks], plugins=[SafetensorsCheckpointIO()], **kwargs
    )
    t.fit(module(), ckpt_path=ckpt_path)
    return losses.values


@pytest.mark.parametrize("with_callback", [True, False])
def test_resume_mid_epoch_draws_the_same_noise(tmp_path, with_callback):
    extra = [RNGStateCheckpoint()] if with_callback else []
    full = _run(tmp_path / "full", 12, list(extra))
    ckpt = SafetensorsModelCheckpoint(dirpath=tmp_path / "part", every_n_train_steps=5)
    _run(tmp_path / "part", 6, [ckpt, *[RNGStateCheckpoint()] * with_callback])
    resumed = _run(tmp_path / "resumed", 12, list(extra), ckpt_path=tmp_path / "part" / "epoch=0-step=5.sft")
    # The model sees the same inputs either way (they depend on the step only); only the RNG differs.
    if with_callback:
        assert resumed == full[5:]
    else:
        assert resumed != full[5:]  # without it, dropout and the jitter diverge: the callback is needed


@pytest.mark.xfail(
    strict=True,
    reason="known limitation: the state is applied after the first fetch, because between on_train_start and "
    "the first batch a lazily created iterator (ResumableDataLoader's, at its first batch) and Lightning's "
    "restart (it sets up the val dataloader) draw from the global RNG where the uninterrupted run did not",
)
@pytest.mark.parametrize("module", [NoisyDataModule, NoisyUnsizedModule], ids=["sized", "unsized"])
def test_resume_with_random_batches_drawn_in_the_main_process(tmp_path, module):
    """Fetching a batch draws from the global RNG: the state must be back before that fetch,
    as in the uninterrupted run (where batch 6 was fetched after the step-5 save; or, for an
    unsized loader that Lightning prefetches, batch 7)."""
    full = _run(tmp_path / "full", 10, [RNGStateCheckpoint()], module=module)
    ckpt = SafetensorsModelCheckpoint(dirpath=tmp_path / "part", every_n_train_steps=5)
    _run(tmp_path / "part", 5, [ckpt, RNGStateCheckpoint()], module=module)
    resumed = _run(
        tmp_path / "resumed",
        10,
        [RNGStateCheckpoint()],
        ckpt_path=tmp_path / "part" / "epoch=0-step=5.sft",
        module=module,
    )
    if module is NoisyDataModule:
        assert resumed == full[5:]
    else:  # the prefetched first batch was drawn before the restore; everything after it matches
        assert resumed[1:] == full[6:]


def test_resume_from_training_controls_quit_checkpoint(tmp_path):
    """``quit@5`` saves at the step boundary and stops; the resume carries on as if never stopped."""
    from lightning_utils.callbacks.training_control import TrainingControl

    full = _run(tmp_path / "full", 10, [RNGStateCheckpoint()])
    control = TrainingControl(source=None, commands=["quit@5"], dirpath=tmp_path / "part", signal=None)
    part = _run(tmp_path / "part", 10, [control, RNGStateCheckpoint()])
    assert len(part) == 5
    resumed = _run(tmp_path / "resumed", 10, [RNGStateCheckpoint()], ckpt_path=tmp_path / "part" / "step=5.sft")
    assert resumed == full[5:]


def test_a_restored_state_that_was_not_used_is_not_applied_to_a_later_fit(tmp_path):
    """Resuming a run that had already finished trains nothing (no on_train_start); the same
    callback in a later, fresh fit must not put that old state back."""
    callback = RNGStateCheckpoint()
    ckpt = SafetensorsModelCheckpoint(dirpath=tmp_path / "part", every_n_train_steps=2)
    fresh = _run(tmp_path / "part", 2, [ckpt, RNGStateCheckpoint()])
    assert _run(tmp_path / "done", 2, [callback], ckpt_path=tmp_path / "part" / "epoch=0-step=2.sft") == []
    assert _run(tmp_path / "again", 2, [callback]) == fresh


class ValidatedModule(NoisyModule):
    """Validation draws from the global RNG too (noise in the metric)."""

    def validation_step(self, batch, batch_idx):
        self.log("val_noise", torch.rand(()))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)


@pytest.mark.parametrize("save", ["every_n_train_steps", "monitor"])
def test_resume_when_validation_runs_at_the_saved_step(tmp_path, save):
    """A step-5 save lands before step 5's validation, which the resumed run does not redo; a
    monitored save lands after it. Either way the resumed run must match the uninterrupted one."""
    kw = {"val_check_interval": 5, "num_sanity_val_steps": 1, "module": ValidatedModule}
    full = _run(tmp_path / "full", 8, [RNGStateCheckpoint()], **kw)
    if save == "monitor":
        ckpt = SafetensorsModelCheckpoint(dirpath=tmp_path / "part", monitor="val_noise", filename="saved")
    else:
        ckpt = SafetensorsModelCheckpoint(dirpath=tmp_path / "part", every_n_train_steps=5, filename="saved")
    _run(tmp_path / "part", 5, [ckpt, RNGStateCheckpoint()], **kw)
    resumed = _run(tmp_path / "resumed", 8, [RNGStateCheckpoint()], ckpt_path=tmp_path / "part" / "saved.sft", **kw)
    assert resumed == full[5:]


class ShuffledValidatedModule(ValidatedModule):
    """Training's sample order (a shuffled loader, seeded from the global RNG each epoch) and the
    noise in its loss are both recorded: either would shift if validation moved the RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[int] = []
        self.validated = 0

    def validation_step(self, batch, batch_idx):
        self.validated += 1
        super().validation_step(batch, batch_idx)

    def training_step(self, batch, batch_idx):
        self.order.append(int(batch.item()))
        x = batch.expand(8, 4) / 8  # bounded inputs: 20 steps stay finite
        return self.net(x).pow(2).mean() + random.random() + float(np.random.rand())

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.arange(8.0).unsqueeze(1), batch_size=1, shuffle=True)


def _draws(tmp, callbacks, **kwargs):
    pl.seed_everything(7)
    module, losses = ShuffledValidatedModule(), Losses()
    cpu_trainer(tmp, max_steps=20, callbacks=[losses, *callbacks], **kwargs).fit(module)
    return module.order, losses.values, module.validated


@pytest.mark.parametrize("with_callback", [True, False])
def test_validating_or_not_never_shifts_trainings_random_numbers(tmp_path, with_callback):
    """Three epochs of 8 shuffled batches with a validation (that draws noise) every 4 steps, against
    the same fit with validation off: with the callback training sees the same sample order and the
    same dropout and jitter draws (so the same losses)."""
    extra = [RNGStateCheckpoint()] if with_callback else []
    validated = _draws(tmp_path / "val", list(extra), val_check_interval=4, num_sanity_val_steps=2)
    unvalidated = _draws(tmp_path / "noval", list(extra), limit_val_batches=0)
    assert validated[2] == 2 + 5 * 2 and unvalidated[2] == 0  # the sanity check, then 5 validations of 2 batches
    assert len(validated[0]) == len(unvalidated[0]) == 20
    assert sorted(validated[0][:8]) == list(range(8))  # a real permutation each epoch
    assert all(math.isfinite(loss) for loss in validated[1])
    if with_callback:
        assert validated[:2] == unvalidated[:2]
    else:
        assert validated[1] != unvalidated[1]  # the validation's draws moved training's: the callback is needed


def test_resume_under_gradient_accumulation(tmp_path):
    """Saves land after an optimizer step, at the end of an accumulation window; 2 batches per step."""
    full = _run(tmp_path / "full", 4, [RNGStateCheckpoint()], accumulate_grad_batches=2)
    ckpt = SafetensorsModelCheckpoint(dirpath=tmp_path / "part", every_n_train_steps=2)
    _run(tmp_path / "part", 2, [ckpt, RNGStateCheckpoint()], accumulate_grad_batches=2)
    resumed = _run(
        tmp_path / "resumed", 4, [RNGStateCheckpoint()], ckpt_path=tmp_path / "part" / "epoch=0-step=2.sft",
        accumulate_grad_batches=2,
    )  # fmt: skip
    assert len(full) == 8 and resumed == full[4:]


class ShuffledModule(NoisyModule):
    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=1, shuffle=True, generator=generator)


def test_resume_at_an_epoch_boundary_with_the_loaders_own_generator(tmp_path):
    """The docstring's advice: the next epoch's iterator then draws nothing from the global RNG."""
    full = _run(tmp_path / "full", 8, [RNGStateCheckpoint()], module=ShuffledModule)
    ckpt = SafetensorsModelCheckpoint(dirpath=tmp_path / "part", every_n_epochs=1)
    _run(tmp_path / "part", 4, [ckpt, RNGStateCheckpoint()], module=ShuffledModule)
    resumed = _run(
        tmp_path / "resumed", 8, [RNGStateCheckpoint()], ckpt_path=tmp_path / "part" / "epoch=0-step=4.sft",
        module=ShuffledModule,
    )  # fmt: skip
    assert resumed == full[4:]


def test_state_is_tensors_and_numbers_and_round_trips(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    state = _collect()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(100), random.random(), np.random.rand(10)  # move every generator on
    from lightning_utils.io import save_state

    save_state({"ranks": [state]}, tmp_path / "rng.sft")
    _apply(load_state(tmp_path / "rng.sft")["ranks"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_cuda_states_fit_the_visible_devices(monkeypatch):
    """A run saved with 4 visible GPUs resumed where 2 are visible sets those 2, never device 2 or 3
    (torch would fail at CUDA init); without CUDA nothing is touched and CUDA stays uninitialised."""
    state = _collect()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": calls.append((int(s[0]), device)))
    monkeypatch.setattr(
        torch.cuda, "set_rng_state_all", lambda states: calls.extend((int(s[0]), i) for i, s in enumerate(states))
    )
    _apply(state)
    assert calls == [(0, 0), (1, 1)]


@pytest.mark.parametrize(("saved_ranks", "world_size", "rank"), [(1, 2, 1), (2, 1, 0)])
def test_other_world_size_warns_instead_of_guessing(saved_ranks, world_size, rank):
    """More ranks than saved: the extra ones keep their seed; fewer: a warning too (the data split changed)."""
    torch.manual_seed(0)
    saved = [_collect() for _ in range(saved_ranks)]
    expected = torch.rand(3)
    cb = RNGStateCheckpoint()
    cb.load_state_dict({"ranks": saved})

    class FakeTrainer:
        global_rank = rank

    FakeTrainer.world_size = world_size
    torch.rand(10)
    with pytest.warns(UserWarning, match=f"states for {saved_ranks} ranks but this run has world_size={world_size}"):
        cb.on_train_start(FakeTrainer(), None)
    cb.on_train_batch_start(FakeTrainer(), None, None, 0)  # where the state is applied
    assert torch.equal(torch.rand(3), expected) == (rank < saved_ranks)


@pytest.mark.ddp
def test_ddp_each_rank_gets_its_own_state_back(tmp_path):
    import json
    from pathlib import Path

    script = Path(__file__).parent / "rng_scripts" / "ddp_rng.py"

    def run(out, steps, ckpt=None):
        proc = run_launcher([str(script), str(out), str(steps)] + ([str(ckpt)] if ckpt else []))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads((out / f"losses-rank{r}.json").read_text()) for r in (0, 1)]

    full = run(tmp_path / "full", 6)
    ckpt = tmp_path / "full" / "ckpt" / "epoch=0-step=3.sft"
    saved = load_state(ckpt)["callbacks"]["RNGStateCheckpoint"]["ranks"]
    assert len(saved) == 2 and not torch.equal(saved[0]["torch"], saved[1]["torch"])
    resumed = run(tmp_path / "resumed", 6, ckpt)
    assert resumed[0] == full[0][3:] and resumed[1] == full[1][3:]
