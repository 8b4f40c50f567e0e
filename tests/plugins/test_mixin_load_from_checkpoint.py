"""``MyModule.load_from_checkpoint("x.sft")`` works with :class:`lightning_utils.plugins.SafetensorsLoadMixin`:
every argument of Lightning's ``load_from_checkpoint`` gives for a ``.sft`` what it gives for the
``.ckpt`` of the same state, and ``.ckpt`` files still take Lightning's own route. Without the
mixin Lightning's call cannot read a ``.sft`` (it calls ``torch.load`` directly)."""

from __future__ import annotations

import pickle
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers.checkpoints import Custom, assert_same
from helpers.lightning import cpu_trainer
from helpers.models import TinyModule, loader

from lightning_utils.io import load_state, save_state
from lightning_utils.plugins import SafetensorsCheckpointIO, SafetensorsLoadMixin, load_from_checkpoint


class Plain(pl.LightningModule):
    """TinyModule's model and steps, with hyperparameters that ``torch.load(weights_only=True)``
    accepts, so Lightning's own ``.ckpt`` route loads it with every argument."""

    def __init__(self, hidden: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    training_step = TinyModule.training_step
    configure_optimizers = TinyModule.configure_optimizers


class Loadable(SafetensorsLoadMixin, Plain):
    """Plain with the mixin: ``load_from_checkpoint`` reads ``.sft`` too."""


class Recording(Loadable):
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.seen_lr = checkpoint["hyper_parameters"]["lr"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Any]:
    """The same trained state as ``m.ckpt`` and ``m.sft`` (written by the trainer, through the plugin)."""
    root = tmp_path_factory.mktemp("mixin")
    pl.seed_everything(0)
    model = Loadable(hidden=6, lr=0.02)
    trainer = cpu_trainer(root, max_steps=2, plugins=[SafetensorsCheckpointIO()])
    trainer.fit(model, loader())
    for suffix in (".ckpt", ".sft"):
        trainer.save_checkpoint(root / f"m{suffix}")
    (root / "h.yaml").write_text("hidden: 6\nlr: 0.5\n")
    return {"root": root, "model": model}


def _same_module(a: pl.LightningModule, b: pl.LightningModule) -> None:
    assert type(a) is type(b)
    assert dict(a.hparams) == dict(b.hparams)
    assert_same(dict(a.state_dict()), dict(b.state_dict()))
    assert a.device == b.device and a.training == b.training


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"map_location": "cpu"},
        {"map_location": torch.device("cpu")},
        {"map_location": {"cpu": "cpu"}},
        {"map_location": lambda storage, location: storage},
        {"strict": True},
        {"lr": 0.7},  # overrides a saved hyperparameter
        {"hidden": 6, "lr": 0.1, "strict": False},
        {"weights_only": True},
    ],
    ids=["defaults", "str", "device", "dict", "callable", "strict", "override", "override+strict", "weights_only"],
)
def test_every_argument_gives_for_sft_what_lightning_gives_for_ckpt(saved, kwargs):
    root = saved["root"]
    from_ckpt = Loadable.load_from_checkpoint(root / "m.ckpt", **kwargs)
    from_sft = Loadable.load_from_checkpoint(root / "m.sft", **kwargs)
    _same_module(from_sft, from_ckpt)
    assert_same(dict(from_sft.state_dict()), dict(saved["model"].state_dict()))
    if "lr" in kwargs:
        assert from_sft.hparams.lr == kwargs["lr"]


def test_hparams_file_and_on_load_checkpoint_see_the_same_values(saved):
    root = saved["root"]
    for path in (root / "m.ckpt", root / "m.sft"):
        loaded = Recording.load_from_checkpoint(path, hparams_file=root / "h.yaml")
        assert loaded.hparams.lr == 0.5 and loaded.seen_lr == 0.5, path
        overridden = Recording.load_from_checkpoint(str(path), hparams_file=str(root / "h.yaml"), lr=0.9)
        assert overridden.hparams.lr == 0.9 and overridden.seen_lr == 0.9, path
    with pytest.raises(ValueError, match=r"\.csv, \.yml or \.yaml"):
        Loadable.load_from_checkpoint(root / "m.sft", hparams_file=root / "h.txt")


def test_strict_loading_reports_missing_keys_for_sft_as_for_ckpt(tmp_path, saved):
    ckpt = load_state(saved["root"] / "m.sft")
    del ckpt["state_dict"]["net.2.bias"]
    save_state(ckpt, tmp_path / "partial.sft")
    save_state(ckpt, tmp_path / "partial.ckpt")
    for path in (tmp_path / "partial.ckpt", tmp_path / "partial.sft"):
        with pytest.raises(RuntimeError, match="net.2.bias"):
            Loadable.load_from_checkpoint(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = Loadable.load_from_checkpoint(path, strict=False)
        assert torch.equal(loaded.net[0].weight, saved["model"].net[0].weight)


def test_ckpt_files_take_lightnings_own_route(tmp_path, saved):
    """A ``.ckpt`` goes to Lightning's ``load_from_checkpoint`` unchanged: its errors are torch's own."""
    ckpt = load_state(saved["root"] / "m.ckpt")
    ckpt["hyper_parameters"]["obj"] = Custom(1)
    save_state(ckpt, tmp_path / "unsafe.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        Loadable.load_from_checkpoint(tmp_path / "unsafe.ckpt")
    assert Loadable.load_from_checkpoint(tmp_path / "unsafe.ckpt", weights_only=False).hparams.hidden == 6
    with open(saved["root"] / "m.ckpt", "rb") as f:  # file objects too
        assert Loadable.load_from_checkpoint(f).hparams.hidden == 6


def test_sft_needs_no_weights_only_allowlist(tmp_path):
    """A ``.sft`` never unpickles, so hyperparameters ``torch.load(weights_only=True)`` refuses in a
    ``.ckpt`` (a ``pathlib`` path here) load without ``weights_only=False``."""

    class WithPath(SafetensorsLoadMixin, TinyModule):
        pass

    trainer = cpu_trainer(tmp_path, max_steps=1, plugins=[SafetensorsCheckpointIO()])
    trainer.fit(WithPath(), loader())
    trainer.save_checkpoint(tmp_path / "p.sft")
    trainer.save_checkpoint(tmp_path / "p.ckpt")
    assert WithPath.load_from_checkpoint(tmp_path / "p.sft").hparams.root == TinyModule().hparams.root
    with pytest.raises(pickle.UnpicklingError, match="PosixPath"):
        WithPath.load_from_checkpoint(tmp_path / "p.ckpt")


def test_without_the_mixin_lightning_cannot_read_sft_and_the_function_can(saved):
    """Lightning reads the file with ``torch.load``, which no plugin can intercept: the README says
    to add the mixin or call ``lightning_utils.plugins.load_from_checkpoint``."""
    with pytest.raises(pickle.UnpicklingError, match="Unsupported operand"):
        Plain.load_from_checkpoint(saved["root"] / "m.sft")
    _same_module(
        load_from_checkpoint(Plain, saved["root"] / "m.sft"), Plain.load_from_checkpoint(saved["root"] / "m.ckpt")
    )


def test_called_on_an_instance_it_refuses_as_lightning_does(saved):
    with pytest.raises(TypeError, match="cannot be called on an instance"):
        saved["model"].load_from_checkpoint(saved["root"] / "m.sft")


def test_a_mixin_listed_after_lightning_module_is_refused_at_class_definition():
    with pytest.raises(TypeError, match="SafetensorsLoadMixin.*before"):

        class Wrong(TinyModule, SafetensorsLoadMixin):
            pass


def test_a_subclass_may_override_and_call_super(saved):
    class Custom(Loadable):
        @classmethod
        def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
            model = super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
            model.marked = True
            return model

    assert Custom.load_from_checkpoint(saved["root"] / "m.sft").marked


def test_datamodules_load_from_sft_too(tmp_path):
    class Data(SafetensorsLoadMixin, pl.LightningDataModule):
        def __init__(self, batch_size: int = 4) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.seen = 0

        def state_dict(self) -> dict[str, Any]:
            return {"seen": 7}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.seen = state["seen"]

        def train_dataloader(self):
            return loader(batch_size=self.hparams.batch_size)

    trainer = cpu_trainer(tmp_path, max_steps=1, plugins=[SafetensorsCheckpointIO()])
    trainer.fit(Loadable(), datamodule=Data(batch_size=2))
    for suffix in (".ckpt", ".sft"):
        trainer.save_checkpoint(tmp_path / f"d{suffix}")
        data = Data.load_from_checkpoint(tmp_path / f"d{suffix}")
        assert data.hparams.batch_size == 2 and data.seen == 7, suffix
        assert Data.load_from_checkpoint(tmp_path / f"d{suffix}", batch_size=3).hparams.batch_size == 3


def test_a_checkpoint_saved_on_a_device_that_is_not_here_loads_on_the_cpu(tmp_path, saved):
    """As Lightning's default ``map_location``: each tensor goes back to the device it was saved
    from when that device is available here, else stays on the CPU."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from lightning_utils.io.state import SKELETON_KEY

    with safe_open(saved["root"] / "m.sft", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        meta = f.metadata()
    skeleton = json.loads(meta[SKELETON_KEY])
    skeleton["devices"] = dict.fromkeys(tensors, "cuda:0")
    meta[SKELETON_KEY] = json.dumps(skeleton)
    save_file(tensors, tmp_path / "gpu.sft", metadata=meta)
    loaded = Loadable.load_from_checkpoint(tmp_path / "gpu.sft")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert loaded.device.type == expected
    assert torch.equal(loaded.net[0].weight.cpu(), saved["model"].net[0].weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to save from")
def test_a_model_trained_on_cuda_comes_back_on_cuda_as_from_ckpt(tmp_path):
    pl.seed_everything(0)
    model = Loadable()
    trainer = cpu_trainer(tmp_path, max_steps=2, accelerator="cuda", plugins=[SafetensorsCheckpointIO()])
    trainer.fit(model, loader())
    for suffix in (".ckpt", ".sft"):
        trainer.save_checkpoint(tmp_path / f"g{suffix}")
    from_ckpt = Loadable.load_from_checkpoint(tmp_path / "g.ckpt")
    from_sft = Loadable.load_from_checkpoint(tmp_path / "g.sft")
    assert from_sft.device == from_ckpt.device and from_sft.device.type == "cuda"
    _same_module(from_sft, from_ckpt)
    assert Loadable.load_from_checkpoint(tmp_path / "g.sft", map_location="cpu").device.type == "cpu"


def test_the_readme_block_runs_as_written(tmp_path, monkeypatch):
    """README's ``SafetensorsLoadMixin`` example, run on a ``ckpts/last.sft`` of its module's state."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "SafetensorsLoadMixin" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme_block"}
    source = block.split("\nmodel = ", 1)[0]  # the class only, to write the checkpoint it loads
    exec(source, namespace)
    module = namespace["MyModule"]()
    save_state({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": pl.__version__}, tmp_path / "ckpts" / "last.sft")  # fmt: skip
    exec(block, namespace)
    model = namespace["model"]
    assert type(model).__name__ == "MyModule" and model.hparams.lr == 1e-3
    assert torch.equal(model.layer.weight, module.layer.weight)
