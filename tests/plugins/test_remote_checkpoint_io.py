"""Checkpoints on object storage in a Trainer: ``SafetensorsCheckpointIO`` and
``SafetensorsModelCheckpoint`` with an ``s3://`` dirpath (top-k removals, ``save_last``,
``ckpt_path="last"``), against moto's S3 server over HTTP; ``memory://`` for the plugin alone."""

from __future__ import annotations

import pytest
import torch
from helpers.checkpoints import assert_same
from helpers.models import fit_tiny
from helpers.s3 import s3_bucket_fixture, s3_server_fixture  # noqa: F401  (the s3_bucket and s3_server fixtures)

from lightning_utils.callbacks import SafetensorsModelCheckpoint
from lightning_utils.io import load_state, storage
from lightning_utils.plugins import SafetensorsCheckpointIO


@pytest.mark.parametrize("suffix", [".sft", ".ckpt"])
def test_the_plugin_saves_loads_and_removes_urls(suffix):
    """The example that used to raise ``ValueError: ... remote paths are not supported``."""
    io = SafetensorsCheckpointIO()
    url = f"memory://bucket/x{suffix}"
    state = {"state_dict": {"w": torch.arange(4.0)}, "global_step": 3}
    io.save_checkpoint(state, url)
    assert_same(io.load_checkpoint(url, weights_only=False), state)
    io.remove_checkpoint(url)
    assert not storage.exists(url)
    io.remove_checkpoint(url)  # already gone: nothing to do
    with pytest.raises(FileNotFoundError, match=url):
        io.load_checkpoint(url)


def test_resume_a_run_from_s3_last_sft_with_top_k_removals(s3_bucket, tmp_path):
    run = f"{s3_bucket}/run"

    def checkpoints():
        return SafetensorsModelCheckpoint(
            dirpath=run, every_n_train_steps=2, save_top_k=2, monitor="step", mode="max", save_last=True
        )

    _, model = fit_tiny(tmp_path, 6, [checkpoints()])
    assert storage.listdir(run) == ["epoch=0-step=4.sft", "epoch=0-step=6.sft", "last.sft"]  # step 2 removed
    last = load_state(f"{run}/last.sft")
    assert last["global_step"] == 6
    assert_same(dict(last["state_dict"]), dict(model.state_dict()))

    resumed, _ = fit_tiny(tmp_path, 8, [checkpoints()], ckpt_path="last")
    assert resumed.ckpt_path == f"{run}/last.sft"
    assert resumed.global_step == 8
    assert load_state(f"{run}/last.sft")["global_step"] == 8
    assert storage.listdir(run) == ["epoch=0-step=6.sft", "epoch=0-step=8.sft", "last.sft"]
