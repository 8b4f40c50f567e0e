"""A run whose checkpoints a ``.sft`` cannot hold fails when ``fit`` starts, before the first step,
naming the key (:func:`lightning_utils.plugins.check_checkpoint_storable`, called by
``SafetensorsModelCheckpoint``); the hyperparameter types users pass are stored and come back."""

from __future__ import annotations

import argparse
import dataclasses
import enum
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers.lightning import cpu_trainer
from helpers.models import TinyModule, loader

from lightning_utils.callbacks import SafetensorsModelCheckpoint
from lightning_utils.io import load_state
from lightning_utils.plugins import SafetensorsCheckpointIO, check_checkpoint_storable


class Act(str, enum.Enum):
    GELU = "gelu"


@dataclasses.dataclass
class Sched:
    warmup: int = 10
    decay: float = 0.5


class HparamsModule(TinyModule):
    """TinyModule with one extra hyperparameter of any type, counting the steps it trains."""

    def __init__(self, extra: Any = None, hidden: int = 8) -> None:
        super().__init__(hidden=hidden)
        self.save_hyperparameters()
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        return super().training_step(batch, batch_idx)


class ObjectState(pl.Callback):
    def state_dict(self) -> dict[str, Any]:
        return {"ok": 1, "handle": object()}


def _fit(tmp_path, model, callbacks, **kwargs) -> pl.Trainer:
    trainer = cpu_trainer(tmp_path, callbacks=callbacks, max_steps=4, **kwargs)
    trainer.fit(model, loader())
    return trainer


def test_an_unstorable_hparam_fails_before_the_first_step_naming_the_key(tmp_path):
    model = HparamsModule(extra={"loss": torch.nn.MSELoss()})
    with pytest.raises(TypeError, match=r"checkpoint\['hyper_parameters'\]\['extra'\]\['loss'\]") as info:
        _fit(tmp_path, model, [SafetensorsModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)])
    assert model.steps == 0 and not list(tmp_path.glob("*.sft"))
    assert "SafetensorsModelCheckpoint" in str(info.value)


def test_training_control_saving_sft_fails_before_the_first_step_too(tmp_path):
    from lightning_utils.callbacks import TrainingControl

    model = HparamsModule(extra={"loss": torch.nn.MSELoss()})
    control = TrainingControl(source=None, save_every_n_steps=2)
    with pytest.raises(TypeError, match=r"checkpoint\['hyper_parameters'\]\['extra'\]\['loss'\]") as info:
        _fit(tmp_path, model, [control], plugins=[SafetensorsCheckpointIO()])
    assert model.steps == 0 and not list(tmp_path.rglob("*.sft"))
    assert "TrainingControl" in str(info.value)
    # the same run saving .ckpt is not checked: torch.save stores the object
    _fit(tmp_path / "ckpt", HparamsModule(extra={"loss": torch.nn.MSELoss()}), [TrainingControl(source=None)])


def test_an_unstorable_callback_state_fails_before_the_first_step(tmp_path):
    model = HparamsModule()
    with pytest.raises(TypeError, match=r"checkpoint\['callbacks'\]\['ObjectState'\]\['handle'\]"):
        _fit(tmp_path, model, [ObjectState(), SafetensorsModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)])
    assert model.steps == 0


def test_weights_only_checkpoints_check_only_what_they_hold(tmp_path):
    """``save_weights_only=True`` files hold no callback state, so an unstorable one is no error."""
    model = HparamsModule()
    _fit(tmp_path, model, [ObjectState(), SafetensorsModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_weights_only=True)])  # fmt: skip
    assert model.steps == 4 and (tmp_path / "epoch=0-step=4.sft").exists()


def test_ckpt_checkpoints_are_not_checked(tmp_path):
    """A ``.ckpt`` (pickle) holds anything: the plugin alone, writing ``.ckpt``, checks nothing."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = HparamsModule(extra={"loss": torch.nn.MSELoss()})
    _fit(
        tmp_path, model, [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)], plugins=[SafetensorsCheckpointIO()]
    )
    assert model.steps == 4


def test_the_hparam_types_users_pass_are_stored_and_resume(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers configs need the test extra")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, bos_token_id=0, eos_token_id=0)
    extra = {
        "lr": np.float32(0.01), "mask": np.array([1, 0, 1], dtype=np.int64), "args": argparse.Namespace(seed=1, name="x"),
        "act": Act.GELU, "sched": Sched(), "config": config,
    }  # fmt: skip
    model = HparamsModule(extra=extra)
    _fit(tmp_path, model, [SafetensorsModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)])
    saved = load_state(tmp_path / "epoch=0-step=4.sft")["hyper_parameters"]["extra"]
    assert type(saved["lr"]) is np.float32 and saved["lr"] == np.float32(0.01)
    assert type(saved["mask"]) is np.ndarray and saved["mask"].tolist() == [1, 0, 1]
    assert saved["args"] == argparse.Namespace(seed=1, name="x")
    assert saved["act"] == "gelu" and saved["sched"] == {"warmup": 10, "decay": 0.5}
    assert type(saved["config"]) is transformers.GPT2Config and saved["config"].to_dict() == config.to_dict()
    resumed = HparamsModule(extra=extra)
    trainer = cpu_trainer(tmp_path, callbacks=[SafetensorsModelCheckpoint(dirpath=tmp_path)], max_steps=6)
    trainer.fit(resumed, loader(), ckpt_path=tmp_path / "epoch=0-step=4.sft")
    assert trainer.global_step == 6 and resumed.steps == 2


def test_check_checkpoint_storable_can_be_called_by_any_callback(tmp_path):
    """What ``TrainingControl`` (or any callback that saves ``.sft``) calls when fit starts."""
    seen: list[str] = []

    class SavesSft(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            try:
                check_checkpoint_storable(trainer, writer="SavesSft")
            except TypeError as exc:
                seen.append(str(exc))
                raise

    model = HparamsModule(extra=[torch.nn.MSELoss()])
    with pytest.raises(TypeError):
        _fit(tmp_path, model, [SavesSft()])
    assert model.steps == 0 and "SavesSft" in seen[0] and "checkpoint['hyper_parameters']['extra'][0]" in seen[0]


def test_datamodule_hparams_optimizer_groups_and_scheduler_state_are_checked(tmp_path):
    class DM(pl.LightningDataModule):
        def __init__(self, fn: Any = None) -> None:
            super().__init__()
            self.save_hyperparameters()

        def train_dataloader(self):
            return loader()

    model = HparamsModule()
    trainer = cpu_trainer(
        tmp_path, callbacks=[SafetensorsModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)], max_steps=2
    )
    with pytest.raises(TypeError, match=r"checkpoint\['datamodule_hyper_parameters'\]\['fn'\]"):
        trainer.fit(model, datamodule=DM(fn=print))
    assert model.steps == 0

    class GroupModule(HparamsModule):
        def configure_optimizers(self):
            return torch.optim.SGD([{"params": self.parameters(), "tag": object()}], lr=0.1)

    model = GroupModule()
    with pytest.raises(TypeError, match=r"checkpoint\['optimizer_states'\]\[0\]\['param_groups'\]\[0\]\['tag'\]"):
        _fit(tmp_path / "g", model, [SafetensorsModelCheckpoint(dirpath=tmp_path / "g", every_n_train_steps=2)])
    assert model.steps == 0

    class Warmup:  # a callable object: LambdaLR saves its __dict__
        def __init__(self) -> None:
            self.handle = object()

        def __call__(self, step: int) -> float:
            return 1.0

    class LambdaModule(HparamsModule):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, Warmup())]

    model = LambdaModule()
    with pytest.raises(TypeError, match=r"checkpoint\['lr_schedulers'\]\[0\]\['lr_lambdas'\]\[0\]\['handle'\]"):
        _fit(tmp_path / "s", model, [SafetensorsModelCheckpoint(dirpath=tmp_path / "s", every_n_train_steps=2)])
    assert model.steps == 0


def test_a_weight_a_sft_cannot_hold_fails_before_the_first_step_naming_the_key(tmp_path):
    model = HparamsModule()
    model.register_buffer("mask", torch.eye(3).to_sparse())  # sparse: no safetensors layout for it
    with pytest.raises(TypeError, match=r"checked when fit starts.*\['state_dict'\]\['mask'\]"):
        _fit(tmp_path, model, [SafetensorsModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2)])
    assert model.steps == 0
    assert not (tmp_path / "ckpts").exists() or not list((tmp_path / "ckpts").iterdir())


def test_weights_not_made_yet_when_fit_starts_are_left_to_the_first_save(tmp_path):
    class Lazy(HparamsModule):  # nn.LazyLinear's weight exists only after the first forward
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    model = Lazy()
    _fit(tmp_path, model, [SafetensorsModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2)])
    assert model.steps == 4
    saved = load_state(tmp_path / "ckpts" / "epoch=0-step=4.sft")["state_dict"]
    assert saved["net.0.weight"].shape == (8, 4)
