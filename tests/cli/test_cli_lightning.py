"""Tests for lightning_utils.cli.lightning: LightningCLI runs with every component by class path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.ports import free_port

import lightning_utils.cli.lightning as cli_lightning
from lightning_utils.cli import main
from lightning_utils.cli.lightning import run_lightning_cli

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures] (the cli extra)")
yaml = pytest.importorskip("yaml")

# The folder of cli_lightning_fixtures.py, whose classes the YAML configs name by class path.
TESTS_DIR = Path(__file__).resolve().parent
FIXTURES = "cli_lightning_fixtures"


@pytest.fixture(autouse=True)
def _fixtures_importable(monkeypatch):
    # The YAML names classes in cli_lightning_fixtures.py (next to this file) whatever pytest's import mode is.
    monkeypatch.syspath_prepend(str(TESTS_DIR))


def write_config(root: Path, *, max_steps: int = 4, **overrides) -> Path:
    """A fit config choosing model, data, optimizer, lr_scheduler, plugin and callbacks by class path."""
    config = {
        "seed_everything": 0,
        "model": {"class_path": f"{FIXTURES}.TinyRegressor", "init_args": {"hidden": 6}},
        "data": {"class_path": f"{FIXTURES}.TinyData", "init_args": {"size": 16, "batch_size": 8}},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01, "weight_decay": 0.0}},
        "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}},
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "default_root_dir": str(root / "run"),
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "plugins": [
                {"class_path": f"{FIXTURES}.CountingCheckpointIO", "init_args": {"log": str(root / "saves.txt")}}
            ],
            "callbacks": [
                {"class_path": f"{FIXTURES}.RunRecorder", "init_args": {"path": str(root / "record.json")}},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(root / "ckpts"), "save_last": True},
                },
            ],
        },
    }
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def record(root: Path) -> dict:
    return json.loads((root / "record.json").read_text())


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One in-process ``fit`` shared by the tests that read its results or checkpoints."""
    root = tmp_path_factory.mktemp("cli_fit")
    sys.path.insert(0, str(TESTS_DIR))
    try:
        config = write_config(root)
        argv_before = list(sys.argv)
        code = run_lightning_cli(["fit", "--config", str(config)])
        assert sys.argv == argv_before, "sys.argv is restored"
    finally:
        sys.path.remove(str(TESTS_DIR))
    return root, config, code


def test_fit_uses_every_component_from_the_config(fitted):
    root, _, code = fitted
    assert code == 0
    fit = record(root)["fit"]
    assert fit["global_step"] == 4
    assert fit["model"] == "TinyRegressor" and fit["hidden"] == 6 and fit["datamodule"] == "TinyData"
    assert fit["optimizer"] == ["AdamW"] and fit["lr_scheduler"] == ["StepLR"]
    # 16 samples / batch 8 = 2 steps per epoch: StepLR halved the lr after each of 2 epochs
    assert fit["lr"] == [pytest.approx(0.01 * 0.5**2)]
    assert fit["checkpoint_io"] == "CountingCheckpointIO"
    assert {"RunRecorder", "ModelCheckpoint", "SaveConfigCallback"} <= set(fit["callbacks"])
    saved = (root / "saves.txt").read_text().split()
    assert str(root / "ckpts" / "last.ckpt") in saved, "checkpoints went through the plugin chosen by class path"
    # the resolved config is saved next to the run, with the seed and class paths spelled out
    saved_config = yaml.safe_load((root / "run" / "config.yaml").read_text())
    assert saved_config["model"]["class_path"] == f"{FIXTURES}.TinyRegressor"
    assert saved_config["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert saved_config["seed_everything"] == 0


def test_rerun_in_the_same_directory_overwrites_the_saved_config(fitted):
    root, config, _ = fitted
    assert run_lightning_cli(["fit", "--config", str(config), "--trainer.max_steps", "2"]) == 0
    assert record(root)["fit"]["global_step"] == 2
    assert yaml.safe_load((root / "run" / "config.yaml").read_text())["trainer"]["max_steps"] == 2


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_other_subcommands_from_a_checkpoint(fitted, subcommand):
    root, config, _ = fitted
    ckpt = root / "ckpts" / "last.ckpt"
    assert run_lightning_cli([subcommand, "--config", str(config), "--ckpt_path", str(ckpt)]) == 0
    result = record(root)[subcommand]
    assert result["model"] == "TinyRegressor" and result["hidden"] == 6
    if subcommand != "predict":
        metric = "val_loss" if subcommand == "validate" else "test_loss"
        assert metric in result["metrics"]


def test_console_entry_point_in_a_subprocess(tmp_path):
    """``python -m lightning_utils.cli fit --config run.yaml``, as a user runs it."""
    config = write_config(tmp_path, max_steps=2)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_utils.cli", "fit", "--config", str(config)],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert record(tmp_path)["fit"]["global_step"] == 2
    assert (tmp_path / "ckpts" / "last.ckpt").is_file()


@pytest.mark.ddp
def test_ddp_two_ranks_through_the_entry_point(tmp_path):
    """Lightning's launcher re-runs ``python -m lightning_utils.cli fit ...`` for rank 1."""
    config = write_config(tmp_path, max_steps=2, trainer__strategy="ddp", trainer__devices=2)
    data = yaml.safe_load(config.read_text())
    data["trainer"]["callbacks"][0]["init_args"]["path"] = str(tmp_path / "record{rank}.json")
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    env = dict(
        os.environ,
        MASTER_PORT=str(free_port()),
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_utils.cli", "fit", "--config", str(config)],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        fit = json.loads((tmp_path / f"record{rank}.json").read_text())["fit"]
        assert fit["world_size"] == 2 and fit["strategy"] == "DDPStrategy"
        assert fit["global_step"] == 2 and fit["optimizer"] == ["AdamW"]


def test_dispatcher_hands_lightning_subcommands_over(capsys):
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--optimizer" in out and "--lr_scheduler" in out and "--trainer.plugins" in out


def test_missing_config_file_names_it(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert run_lightning_cli(["fit", "--config", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_unknown_class_path_names_it(tmp_path, capsys):
    config = write_config(tmp_path, model__class_path=f"{FIXTURES}.NoSuchModel")
    assert run_lightning_cli(["fit", "--config", str(config)]) == 2
    assert "NoSuchModel" in capsys.readouterr().err


def test_missing_jsonargparse_gives_a_clear_message(monkeypatch, capsys):
    from lightning_utilities.core.imports import RequirementCache

    monkeypatch.setattr(cli_lightning, "_CLI_REQUIREMENT", RequirementCache("lightning-utils-absent-package>=1"))
    assert run_lightning_cli(["fit", "--config", "run.yaml"]) == 2
    err = capsys.readouterr().err
    assert "jsonargparse[signatures]" in err and "pip install 'lightning-utils[cli]'" in err


def test_ckpt_path_to_a_weights_file_is_refused_with_its_name(tmp_path, capsys):
    """A plain weights ``.sft`` (ExportWeights, save_weights) is not a training checkpoint; Lightning
    would fail deep inside with ``KeyError: 'pytorch-lightning_version'``."""
    import torch

    from lightning_utils.io import save_weights

    weights = tmp_path / "model.sft"
    save_weights({"net.0.weight": torch.zeros(6, 4)}, weights)
    config = write_config(
        tmp_path, trainer__plugins=[{"class_path": "lightning_utils.plugins.SafetensorsCheckpointIO"}]
    )
    assert run_lightning_cli(["fit", "--config", str(config), "--ckpt_path", str(weights)]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "not a Lightning training checkpoint" in err
    assert not (tmp_path / "record.json").exists(), "nothing trained"


def test_safetensors_checkpoints_resume_and_reload_by_class_path(tmp_path):
    """``.sft`` checkpoints through the plugin and callback chosen in YAML; ``--ckpt_path x.sft`` resumes."""
    config = write_config(
        tmp_path,
        max_steps=2,
        trainer__plugins=[{"class_path": "lightning_utils.plugins.SafetensorsCheckpointIO"}],
        trainer__callbacks=[
            {"class_path": f"{FIXTURES}.RunRecorder", "init_args": {"path": str(tmp_path / "record.json")}},
            {
                "class_path": "lightning_utils.callbacks.safetensors_model_checkpoint.SafetensorsModelCheckpoint",
                "init_args": {"dirpath": str(tmp_path / "ckpts"), "save_last": True},
            },
        ],
    )
    assert run_lightning_cli(["fit", "--config", str(config)]) == 0
    last = tmp_path / "ckpts" / "last.sft"
    assert last.is_file() and record(tmp_path)["fit"]["checkpoint_io"] == "SafetensorsCheckpointIO"
    from lightning_utils.io import load_state

    saved = load_state(last)
    assert saved["global_step"] == 2 and saved["hyper_parameters"]["hidden"] == 6
    # LightningCLI re-reads the model's hyperparameters from ckpt_path (torch.load cannot read
    # a .sft); then the trainer resumes from it: 2 more steps to reach max_steps=4.
    argv = ["fit", "--config", str(config), "--ckpt_path", str(last), "--trainer.max_steps", "4"]
    assert run_lightning_cli(argv) == 0
    assert record(tmp_path)["fit"]["global_step"] == 4
    assert load_state(last)["global_step"] == 4
    assert run_lightning_cli(["test", "--config", str(config), "--ckpt_path", str(last)]) == 0
    assert "test_loss" in record(tmp_path)["test"]["metrics"]


@pytest.mark.parametrize("suffix", [".sft", ".ckpt"])
def test_ckpt_path_hyperparameters_override_the_config_and_ignored_ones_come_from_it(tmp_path, suffix):
    """``--ckpt_path`` rebuilds the model from the checkpoint's hyperparameters (``hidden`` must
    match the saved weights), while arguments the model left out of ``save_hyperparameters``
    (``ignore=``) still come from the config."""
    from lightning_utils.io import load_state

    sft = suffix == ".sft"
    checkpoint_cls = (
        "lightning_utils.callbacks.safetensors_model_checkpoint.SafetensorsModelCheckpoint"
        if sft else "lightning.pytorch.callbacks.ModelCheckpoint"
    )  # fmt: skip

    def config(hidden, note, n_q):
        return write_config(
            tmp_path,
            max_steps=2,
            model={
                "class_path": f"{FIXTURES}.PatternRegressor",
                "init_args": {
                    "hidden": hidden,
                    "note": note,
                    "pattern": {
                        "class_path": "lightning_utils.patterns.DelayedPatternProvider",
                        "init_args": {"n_q": n_q},
                    },
                },
            },
            trainer__plugins=[{"class_path": "lightning_utils.plugins.SafetensorsCheckpointIO"}] if sft else [],
            trainer__callbacks=[
                {"class_path": f"{FIXTURES}.RunRecorder", "init_args": {"path": str(tmp_path / "record.json")}},
                {"class_path": checkpoint_cls, "init_args": {"dirpath": str(tmp_path / "ckpts"), "save_last": True}},
            ],
        )

    assert run_lightning_cli(["fit", "--config", str(config(6, "first", 2))]) == 0
    last = tmp_path / "ckpts" / f"last{suffix}"
    saved = load_state(last)["hyper_parameters"]
    assert saved["hidden"] == 6 and "pattern" not in saved and "note" not in saved
    argv = ["fit", "--config", str(config(10, "second", 3)), "--ckpt_path", str(last), "--trainer.max_steps", "4"]
    assert run_lightning_cli(argv) == 0
    fit = record(tmp_path)["fit"]
    assert fit["global_step"] == 4 and fit["hidden"] == fit["layer_width"] == 6  # the checkpoint's, not 10
    assert (
        fit["note"] == "second"
        and fit["pattern"] == "DelayedPatternProvider(n_q=3, delays=[0, 1, 2], flatten_first=0, empty_initial=0)"
    )
    if sft:  # a sharded .sft directory (lightning_utils.strategies.ModelParallelStrategy writes them) too
        from lightning_utils.io.sharded import save_sharded

        sharded = tmp_path / "ckpts" / "step=4.sft"
        save_sharded(load_state(last), sharded)
        argv = ["fit", "--config", str(config(10, "third", 3)), "--ckpt_path", str(sharded), "--trainer.max_steps", "6"]
        assert run_lightning_cli(argv) == 0
        fit = record(tmp_path)["fit"]
        assert fit["global_step"] == 6 and fit["hidden"] == fit["layer_width"] == 6 and fit["note"] == "third"
