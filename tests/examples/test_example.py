"""The main example runs end to end (small settings) and its resume check passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from helpers.checkpoints import assert_same

from lightning_utils.io import load_state

ROOT = Path(__file__).resolve().parents[2]


def _sorted_keys(obj):
    """``obj`` with every dict's keys in sorted order (by their repr), for an order-blind ``assert_same``."""
    if isinstance(obj, dict):
        return {k: _sorted_keys(obj[k]) for k in sorted(obj, key=repr)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_sorted_keys(v) for v in obj)
    return obj


def test_train_codec_lm_example_resumes_exactly(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "train_codec_lm.py"), "--out", str(tmp_path), "--max-steps", "12",
           "--interrupt-at", "8", "--save-every", "4", "--items", "64", "--batch-size", "8", "--dim", "32", "--layers", "1",
           "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed losses equal the uninterrupted run's, step for step: True" in proc.stdout
    assert "resumed sample order equals the uninterrupted run's: True" in proc.stdout
    assert (tmp_path / "resumed" / "checkpoints" / "last.sft").is_file()
    # the interruption really was mid-epoch, so the resumable loader did the work
    state = load_state(tmp_path / "interrupted" / "checkpoints" / "step=8.sft")
    sampler = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["sampler"]
    assert 0 < sampler["position"] < sampler["num_batches"]
    assert (tmp_path / "full" / "export" / "weights-step=12.sft").is_file()
    assert (tmp_path / "full" / "metrics.jsonl").is_file()


def test_lightning_cli_config_runs_and_resumes_from_sft(tmp_path):
    import os

    config = str(ROOT / "examples" / "configs" / "codec_lm.yaml")
    small = [
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.items",
        "64",
        "--data.init_args.batch_size",
        "8",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), str(ROOT)])}
    run = {
        "capture_output": True,
        "text": True,
        "timeout": 600,
        "stdin": subprocess.DEVNULL,
        "cwd": tmp_path,
        "env": env,
    }
    first = subprocess.run([sys.executable, str(ROOT / "examples" / "train_codec_lm.py"), "fit", "--config", config,
                            "--trainer.max_steps", "6", *small], **run)  # fmt: skip
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    last = tmp_path / "codec_lm_run" / "checkpoints" / "last.sft"
    assert load_state(last)["global_step"] == 6
    second = subprocess.run([sys.executable, "-m", "lightning_utils.cli", "fit", "--config", config, "--trainer.max_steps", "9",
                             "--ckpt_path", str(last), *small], **run)  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    state = load_state(last)
    assert state["global_step"] == 9
    assert type(state["optimizer_states"][0]["state"][0]["seed"]) is int  # APOLLO state, no pickle
    assert (tmp_path / "codec_lm_run" / "export" / "weights-step=9.sft").is_file()

    # "resume, exactly": the same 9 steps uninterrupted end bit-equal (weights, optimizer state:
    # ApolloMini's moments and projection seeds, the scheduler), through the same losses and lrs
    straight = tmp_path / "straight"
    straight.mkdir()
    third = subprocess.run([sys.executable, str(ROOT / "examples" / "train_codec_lm.py"), "fit", "--config", config,
                            "--trainer.max_steps", "9", *small], **{**run, "cwd": straight})  # fmt: skip
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    reference = load_state(straight / "codec_lm_run" / "checkpoints" / "last.sft")
    assert reference["global_step"] == 9 and state["state_dict"].keys() == reference["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        assert torch.equal(state["state_dict"][key], value), key
    # (torch's optimizer load_state_dict puts param_names first in a restored param group: the key order differs)
    assert_same(_sorted_keys(state["optimizer_states"]), _sorted_keys(reference["optimizer_states"]))
    assert state["lr_schedulers"] == reference["lr_schedulers"]

    def rows(root: Path) -> list[dict]:  # MetricsPrinter's lines (6 significant digits), one per step
        lines = (root / "codec_lm_run" / "metrics.jsonl").read_text().splitlines()
        return [{k: r[k] for k in ("step", "lr", "loss")} for r in map(json.loads, lines)]

    resumed, uninterrupted = rows(tmp_path), rows(straight)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6, 7, 8, 9]  # 6 steps, then 3 after the resume
    assert resumed == uninterrupted


def test_example_loader_batches_respect_the_duration_cap():
    # BatchedOrderedSampler yields positions in bucket order; the example must read the dataset
    # in that order, or its batches are not duration-bucketed at all.
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from train_codec_lm import DataConfig, SyntheticCodecDataset, make_loader
    finally:
        sys.path.remove(str(ROOT / "examples"))
    cfg = DataConfig(items=96)
    dataset = SyntheticCodecDataset(cfg)
    seen = []
    for batch in make_loader(dataset, batch_size=8, seed=0):
        lengths = [dataset.lengths[i] for i in batch["index"].tolist()]
        assert lengths == batch["lengths"].tolist()  # the collated items are the sampled ones
        assert max(lengths) / cfg.frame_rate * len(lengths) <= 1.6 * 8 + 1e-9
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(96))  # one epoch covers every utterance once
