"""TrainingControl's checkpoints resume exactly, the final one included, and ``ckpt_path="last"``
finds the latest of them.

An uninterrupted run records the sample indices and losses of every step; a run stopped early
(``max_steps``, ``quit``, another callback's ``should_stop``) is extended from TrainingControl's
checkpoint and must train on exactly the rest: same indices, same losses.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "scripts"))

import loader_harness as H

from lightning_utils.callbacks.training_control import TrainingControl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def control(**kwargs):
    return TrainingControl(source=None, signal=None, **kwargs)


def run(root, max_steps, ckpt_path=None, callbacks=(), fmt="ckpt", kind="random", **kwargs):
    return H.fit_model(
        lambda: H.make_loader(kind),
        str(root),
        ckpt_path=ckpt_path,
        callbacks=list(callbacks),
        max_epochs=-1,
        max_steps=max_steps,
        fmt=fmt,
        **kwargs,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """12 steps (two epochs of 6) without a stop."""
    _, model = run(tmp_path_factory.mktemp("full"), 12)
    return model


def fit_loop_epochs(path):
    ckpt = H.load_checkpoint_file(str(path))
    return ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]


@pytest.mark.parametrize("fmt", ["ckpt", "sft"])
def test_final_save_at_max_steps_mid_epoch_resumes_exactly(tmp_path, uninterrupted, fmt):
    """max_steps=4 stops in the middle of the first epoch (6 batches); extending the run to 8 steps
    from TrainingControl's final ``step=4`` checkpoint trains steps 5-8 of the uninterrupted run."""
    run(tmp_path, 4, callbacks=[control()], fmt=fmt)
    final = tmp_path / "checkpoints" / f"step=4.{fmt}"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [final.name]
    # written at the last step boundary, like ModelCheckpoint(every_n_train_steps): mid-epoch
    assert fit_loop_epochs(final)["processed"] == 0
    _, rest = run(tmp_path, 8, ckpt_path=str(final), callbacks=[control()], fmt=fmt)
    assert rest.seen == uninterrupted.seen[4:8]
    assert rest.losses == pytest.approx(uninterrupted.losses[4:8], rel=1e-6, abs=0)
    # and that run's own final save resumes exactly too (the second stop is mid-epoch again)
    _, more = run(tmp_path, 11, ckpt_path=str(tmp_path / "checkpoints" / f"step=8.{fmt}"), fmt=fmt)
    assert more.seen == uninterrupted.seen[8:11]
    assert more.losses == pytest.approx(uninterrupted.losses[8:11], rel=1e-6, abs=0)


class StopAt(L.Callback):
    """Another callback ending the run mid-epoch (as EarlyStopping or a Timer would)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("kind", ["random", "batched"])
def test_final_save_after_should_stop_mid_epoch_resumes_exactly(tmp_path, kind):
    """The run is ended by another callback's ``should_stop`` at step 3: TrainingControl's save at
    the end of training happens after Lightning counted the epoch as processed; resuming still
    continues the epoch."""
    _, full = run(tmp_path / "full", 10, kind=kind)
    run(tmp_path, 100, callbacks=[control(), StopAt(3)], kind=kind)
    final = tmp_path / "checkpoints" / "step=3.ckpt"
    assert fit_loop_epochs(final)["processed"] == 1  # written after Lightning closed the epoch
    _, rest = run(tmp_path, 10, ckpt_path=str(final), callbacks=[control()], kind=kind)
    assert rest.seen == full.seen[3:10]
    assert rest.losses == pytest.approx(full.losses[3:10], rel=1e-6, abs=0)


def test_quit_save_resumes_exactly(tmp_path, uninterrupted):
    run(tmp_path, 100, callbacks=[control(commands=["quit@5"])])
    _, rest = run(tmp_path, 12, ckpt_path=str(tmp_path / "checkpoints" / "step=5.ckpt"), callbacks=[control()])
    assert rest.seen == uninterrupted.seen[5:12]
    assert rest.losses == pytest.approx(uninterrupted.losses[5:12], rel=1e-6, abs=0)


def test_trainer_save_checkpoint_after_fit_resumes_exactly(tmp_path, uninterrupted):
    trainer, _ = run(tmp_path, 4, callbacks=[control(save_on_train_end=False)])
    path = tmp_path / "after_fit.ckpt"
    trainer.save_checkpoint(path)
    _, rest = run(tmp_path, 12, ckpt_path=str(path), callbacks=[control()])
    assert rest.seen == uninterrupted.seen[4:12]
    assert rest.losses == pytest.approx(uninterrupted.losses[4:12], rel=1e-6, abs=0)
    assert not (tmp_path / "checkpoints" / "step=4.ckpt").exists()
    assert torch.load(path, weights_only=False)["global_step"] == 4


def last_checkpoint(dirpath, save_last, fmt="sft"):
    checkpoint_class = H._checkpoint_class(fmt)
    return checkpoint_class(
        dirpath=dirpath, every_n_train_steps=3, save_top_k=-1, filename="{step}", save_last=save_last
    )


@pytest.mark.parametrize("save_last", [True, "link"])
def test_ckpt_path_last_after_quit_restores_the_quit_save_and_quit_does_not_fire_again(
    tmp_path, uninterrupted, save_last
):
    """ModelCheckpoint saves every 3 steps with save_last; ``quit@5`` saves ``step=5.sft`` into its
    folder. ``fit(ckpt_path="last")`` must resume at step 5 (not 3), and ``quit@5`` must not run
    again: the resumed run trains on to max_steps, exactly as the uninterrupted run."""
    ckpts = tmp_path / "ckpts"
    cfg = {"commands": ["quit@5"]}
    trainer, _ = run(tmp_path, 100, callbacks=[last_checkpoint(ckpts, save_last), control(**cfg)], fmt="sft")
    assert trainer.global_step == 5
    last = ckpts / "last.sft"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.sft", "step=3.sft", "step=5.sft"]
    assert H.load_checkpoint_file(str(last))["global_step"] == 5
    if save_last == "link":
        assert last.is_symlink() and os.readlink(last) == "step=5.sft"
    else:
        assert not last.is_symlink()
    resumed, rest = run(
        tmp_path, 12, ckpt_path="last", callbacks=[last_checkpoint(ckpts, save_last), control(**cfg)], fmt="sft"
    )
    assert resumed.global_step == 12
    assert rest.seen == uninterrupted.seen[5:12]
    assert rest.losses == pytest.approx(uninterrupted.losses[5:12], rel=1e-6, abs=0)
    # the last file follows the saves of the resumed run too (ModelCheckpoint's own, then TrainingControl's final)
    assert H.load_checkpoint_file(str(last))["global_step"] == 12
    assert not list(ckpts.glob(".lu-tmp-*")) and not list(ckpts.glob("*.tmp*"))
