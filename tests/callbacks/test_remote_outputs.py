"""TrainingControl saves and ExportWeights exports to an ``s3://`` folder, in a single-process
Trainer, against moto's S3 server on 127.0.0.1 (the FSDP2 runs are in
tests/strategies/test_remote_sharded_checkpoints.py): nothing lands in a local ``s3:`` folder,
``last`` follows TrainingControl's saves, a Hugging Face export replaced under the same name never
mixes two exports, and a failed one leaves nothing."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.hf_export_models import HFModule, logits
from helpers.lightning import cpu_trainer
from helpers.models import TinyModule, loader
from helpers.s3 import s3_bucket_fixture, s3_server_fixture  # noqa: F401  (the s3_bucket and s3_server fixtures)

from lightning_utils.callbacks import ExportWeights, SafetensorsModelCheckpoint, TrainingControl
from lightning_utils.io import load_state, storage
from lightning_utils.io.weights import staged_directory


def test_training_control_saves_into_the_checkpoint_callbacks_url_and_last_follows(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a URL mistaken for a local path would land
    run = f"{s3_bucket}/run"
    checkpoint = SafetensorsModelCheckpoint(dirpath=run, every_n_train_steps=100, save_last=True)
    control = TrainingControl(source=None, save_every_n_steps=3, save_on_train_end=False)
    trainer = cpu_trainer(tmp_path, [checkpoint, control], max_steps=7, suffix=".sft")
    trainer.fit(TinyModule(), loader())
    assert control.last_checkpoint_path == f"{run}/step=6.sft"
    assert storage.listdir(run) == ["last.sft", "step=3.sft", "step=6.sft"]
    assert load_state(f"{run}/step=3.sft")["global_step"] == 3
    assert load_state(f"{run}/last.sft")["global_step"] == 6  # follows TrainingControl's newest save
    assert os.listdir(tmp_path) == []  # nothing local: no "s3:" folder, no checkpoints/
    resumed = cpu_trainer(
        tmp_path, [SafetensorsModelCheckpoint(dirpath=run, save_last=True)], max_steps=8, suffix=".sft"
    )
    resumed.fit(TinyModule(), loader(), ckpt_path="last")
    assert resumed.ckpt_path == f"{run}/last.sft"
    assert resumed.global_step == 8  # steps 7 and 8 run after the restored step 6


def test_training_control_own_url_dirpath_updates_last_by_a_second_save(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = f"{s3_bucket}/run"
    checkpoint = SafetensorsModelCheckpoint(dirpath=run, every_n_train_steps=100, save_last=True)
    control = TrainingControl(source=None, dirpath=run, filename="ctl-{step}", save_every_n_steps=4)
    trainer = cpu_trainer(tmp_path, [checkpoint, control], max_steps=4, suffix=".sft")
    trainer.fit(TinyModule(), loader())
    assert "ctl-4.sft" in storage.listdir(run)
    # object storage has no links or renames: "last" is a second save of the same state
    assert storage.is_file(f"{run}/last.sft")
    assert load_state(f"{run}/last.sft")["global_step"] == 4
    assert os.listdir(tmp_path) == []


def test_export_weights_writes_under_a_url(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    export = ExportWeights(dirpath=f"{s3_bucket}/export", filename="w-{step}")
    trainer = cpu_trainer(tmp_path, [export], max_steps=2)
    model = TinyModule()
    trainer.fit(model, loader())
    assert export.last_path == f"{s3_bucket}/export/w-2.sft"
    weights = load_state(export.last_path)["module"]
    assert set(weights) == {f"net.{k}" for k in model.net.state_dict()}
    assert torch.equal(weights["net.0.weight"], model.net[0].weight.detach())
    assert os.listdir(tmp_path) == []


def test_a_hugging_face_export_replaced_at_a_url_never_mixes_two_exports(s3_bucket, tmp_path):
    from transformers import GPT2LMHeadModel

    folder = f"{s3_bucket}/export"
    sharded = ExportWeights(dirpath=folder, filename="hf", max_shard_size="40KB")
    cpu_trainer(tmp_path, [sharded], max_steps=1).fit(HFModule("gpt2"))
    first = storage.listdir(f"{folder}/hf")
    assert "model.safetensors.index.json" in first and len([n for n in first if n.startswith("model-")]) > 1
    module = HFModule("gpt2")
    single = ExportWeights(dirpath=folder, filename="hf")
    cpu_trainer(tmp_path, [single], max_steps=2).fit(module)
    assert storage.listdir(f"{folder}/hf") == ["config.json", "generation_config.json", "model.safetensors"]
    local = tmp_path / "hf"
    local.mkdir()
    for name in storage.listdir(f"{folder}/hf"):
        (local / name).write_bytes(storage.read_bytes(f"{folder}/hf/{name}"))
    assert torch.allclose(logits(GPT2LMHeadModel.from_pretrained(local)), logits(module.model), atol=1e-6)


def test_a_failed_directory_export_at_a_url_leaves_nothing(s3_bucket):
    url = f"{s3_bucket}/export/hf"
    with staged_directory(url) as folder, storage.atomic_writer(folder / "model.safetensors.index.json") as f:
        f.write(b"{}")  # an earlier, complete export
    seen = []

    def failing_export() -> None:
        with staged_directory(url) as folder:
            with storage.atomic_writer(folder / "config.json") as f:
                f.write(b"{}")
            seen.extend(storage.listdir(url))
            raise RuntimeError("gather failed")

    with pytest.raises(RuntimeError, match="gather failed"):
        failing_export()
    assert seen == ["config.json"]  # the earlier export was gone before the first new file
    assert storage.listdir(url) == []


def test_a_local_training_control_keeps_a_url_checkpoint_callbacks_last_current(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = f"{s3_bucket}/run"
    checkpoint = SafetensorsModelCheckpoint(dirpath=run, every_n_train_steps=100, save_last=True)
    control = TrainingControl(source=None, dirpath=tmp_path / "local", save_every_n_steps=3, save_on_train_end=False)
    trainer = cpu_trainer(tmp_path, [checkpoint, control], max_steps=4, suffix=".sft")
    trainer.fit(TinyModule(), loader())
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["step=3.sft"]
    assert load_state(f"{run}/last.sft")["global_step"] == 3  # a second save into the bucket, not a local copy
    assert not (tmp_path / "s3:").exists()


def test_a_failed_config_write_leaves_the_earlier_local_export_as_it_was(tmp_path, monkeypatch):
    from lightning_utils.io import hf_export

    export = ExportWeights(dirpath=tmp_path / "export", filename="hf")
    cpu_trainer(tmp_path, [export], max_steps=1).fit(HFModule("gpt2"))
    folder = tmp_path / "export" / "hf"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def config_write_fails(*args, **kwargs):
        raise OSError("disk went away while writing config.json")

    monkeypatch.setattr(hf_export, "write_hf_configs", config_write_fails)
    with pytest.raises(OSError, match="disk went away"):
        cpu_trainer(tmp_path, [ExportWeights(dirpath=tmp_path / "export", filename="hf")], max_steps=2).fit(
            HFModule("gpt2")
        )
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["hf"]  # no stage left beside it
