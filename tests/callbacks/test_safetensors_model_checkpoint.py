"""``SafetensorsModelCheckpoint`` (:mod:`lightning_utils.callbacks.safetensors_model_checkpoint`): every
``ModelCheckpoint`` feature with ``.sft`` files, the plugin installed at setup, foreign plugins refused."""

from __future__ import annotations

import pytest
from helpers.models import fit_tiny

from lightning_utils.callbacks import SafetensorsModelCheckpoint


def test_ckpt_path_last_and_top_k(tmp_path):
    cb = SafetensorsModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=2, save_top_k=2, monitor="step", mode="max", save_last=True
    )
    fit_tiny(tmp_path, 8, [cb])  # no plugin given: the callback installs SafetensorsCheckpointIO
    files = sorted(p.name for p in tmp_path.glob("*.sft"))
    assert files == ["epoch=0-step=6.sft", "epoch=0-step=8.sft", "last.sft"]
    t, _ = fit_tiny(tmp_path, 10, [SafetensorsModelCheckpoint(dirpath=tmp_path, save_last=True)], ckpt_path="last")
    assert t.global_step == 10


def test_a_foreign_checkpoint_plugin_is_not_silently_replaced(tmp_path):
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class MyIO(TorchCheckpointIO):
        pass

    with pytest.raises(RuntimeError, match="MyIO"):
        fit_tiny(tmp_path, 2, [SafetensorsModelCheckpoint(dirpath=tmp_path)], plugins=[MyIO()])
