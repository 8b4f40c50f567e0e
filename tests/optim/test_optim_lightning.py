"""Apollo inside Lightning: configure_optimizers, LightningCLI class paths, accumulation,
clipping, bf16-mixed on CPU, and bit-identical resume in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.lightning import cpu_trainer

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from optim_lm import VOCAB, TinyLM, TinyLMBase, TokenData

from lightning_utils.optim import Apollo, ApolloMini, WarmupLR

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def test_configure_optimizers_trains_and_schedules(tmp_path):
    model = TinyLM(lr=2e-2, warmup_steps=3)
    trainer = cpu_trainer(tmp_path, max_steps=15)
    trainer.fit(model, datamodule=TokenData(n=40))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, ApolloMini)
    assert isinstance(trainer.lr_scheduler_configs[0].scheduler, WarmupLR)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-2, 2e-2])  # warmup done
    state = optimizer.state[model.block[0].weight]
    assert state["exp_avg"].shape == (64, 1) and state["step"] == 15  # rank-1 state on the MLP
    assert optimizer.state[model.embed.weight]["exp_avg"].shape == (VOCAB, 16)  # AdamW by name
    assert sum(model.losses[-3:]) / 3 < 0.8 * sum(model.losses[:3]) / 3


def _fit_params(tmp_path, batch_size, accumulate, steps=3):
    model = TinyLM(lr=1e-2)
    trainer = cpu_trainer(tmp_path, max_steps=steps, accumulate_grad_batches=accumulate)
    trainer.fit(model, datamodule=TokenData(n=48, batch_size=batch_size))
    return model, trainer


def test_gradient_accumulation_matches_a_large_batch(tmp_path):
    big, _ = _fit_params(tmp_path, batch_size=8, accumulate=1)
    accumulated, trainer = _fit_params(tmp_path, batch_size=4, accumulate=2)
    assert trainer.optimizers[0].state[accumulated.block[0].weight]["step"] == 3
    assert len(accumulated.losses) == 6  # six micro-batches for three optimizer steps
    for (name, a), b in zip(big.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_gradient_clipping_reaches_the_optimizer(tmp_path):
    norms: list[float] = []

    class Recording(TinyLM):
        def configure_optimizers(self):
            config = super().configure_optimizers()

            def record(optimizer, args, kwargs):
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

            config["optimizer"].register_step_post_hook(record)
            return config

    trainer = cpu_trainer(tmp_path, max_steps=3, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
    trainer.fit(Recording(), datamodule=TokenData())
    assert len(norms) == 3 and max(norms) <= 0.05 * (1 + 1e-4)


def test_bf16_mixed_precision_on_cpu(tmp_path):
    model = TinyLM(lr=1e-2)
    before = model.block[0].weight.detach().clone()
    trainer = cpu_trainer(tmp_path, max_steps=4, precision="bf16-mixed")
    trainer.fit(model, datamodule=TokenData())
    optimizer = trainer.optimizers[0]
    assert all(torch.isfinite(torch.tensor(model.losses)))
    assert model.block[0].weight.dtype == torch.float32
    assert not torch.equal(before, model.block[0].weight.detach())
    assert all(v.dtype == torch.float32 for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


# --- LightningCLI by class path ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI warns when pytest's own command line is in sys.argv next to args=...
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])


def _cli(args, tmp_path):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (the test/cli extra)")
    from lightning.pytorch.cli import LightningCLI

    base = [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_steps=3",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = LightningCLI(TinyLMBase, TokenData, run=False, args=base + args, save_config_callback=None)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def test_lightning_cli_class_path_flags(tmp_path):
    cli = _cli(
        [
            "--optimizer=lightning_utils.optim.ApolloMini",
            "--optimizer.lr=0.02",
            f"--optimizer.exclude_dims=[{VOCAB}]",
            "--optimizer.update_proj_gap=50",
            "--optimizer.betas=[0.8, 0.95]",
            "--optimizer.weight_decay=0.01",
            "--lr_scheduler=lightning_utils.optim.WarmupLR",
            "--lr_scheduler.warmup_steps=10",
        ],
        tmp_path,
    )
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, ApolloMini)
    group = optimizer.param_groups[0]
    assert group["update_proj_gap"] == 50 and group["exclude_dims"] == (VOCAB,)
    assert group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.01
    # LightningCLI's automatic scheduler uses Lightning's default interval, "epoch": three steps
    # inside the first epoch leave WarmupLR at its first value, 1/10 of the base lr.
    assert group["lr"] == pytest.approx(0.02 / 10)
    model = cli.model
    assert optimizer.state[model.block[0].weight]["exp_avg"].shape == (64, 1)
    assert optimizer.state[model.embed.weight]["exp_avg"].shape == (VOCAB, 16)  # vocab dim -> AdamW
    assert optimizer.state[model.head.weight]["exp_avg"].shape == (VOCAB, 16)
    assert optimizer.state[model.norm.weight]["exp_avg"].shape == (16,)


def test_lightning_cli_yaml_config_with_apollo_rule(tmp_path):
    config = tmp_path / "optim.yaml"
    config.write_text(
        f"""
optimizer:
  class_path: lightning_utils.optim.Apollo
  init_args:
    lr: 0.01
    rank: 4
    scale_type: channel
    update_proj_gap: 200
    weight_decay: 0.01
    exclude_dims: [{VOCAB}]   # embeddings and the LM head have the vocabulary size
    min_numel: 512            # small matrices stay on AdamW
lr_scheduler:
  class_path: lightning_utils.optim.NoamLR
  init_args:
    warmup_steps: 2
    d_model: 16
"""
    )
    cli = _cli([f"--config={config}"], tmp_path)
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is Apollo
    model = cli.model
    assert optimizer.state[model.block[0].weight]["exp_avg"].shape == (64, 4)
    assert optimizer.state[model.block[2].weight]["exp_avg"].shape == (4, 64)
    assert optimizer.state[model.embed.weight]["exp_avg"].shape == (VOCAB, 16)


def test_lightning_cli_reports_bad_option(tmp_path):
    # jsonargparse accepts any int; the optimizer, built in configure_optimizers, names the option
    with pytest.raises(ValueError, match=r"ApolloMini: invalid rank=-1"):
        _cli(["--optimizer=lightning_utils.optim.ApolloMini", "--optimizer.rank=-1"], tmp_path)


# --- resume in a fresh process -------------------------------------------------------------------


def _start_script(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / "optim_resume_run.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def _finish(proc: subprocess.Popen) -> None:
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]


def _run_script(*args: str) -> None:
    _finish(_start_script(*args))


def test_resume_in_fresh_process_is_bit_identical(tmp_path):
    """One full run writes a .ckpt (torch) and a .sft (safetensors) checkpoint at step 5; each is
    resumed in a fresh interpreter under another global seed."""
    _run_script("--out", str(tmp_path / "full.pt"), "--save-dir", str(tmp_path), "--suffixes", ".ckpt,.sft")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    # both resumes at once: the two interpreters start up in parallel
    running = {
        suffix: _start_script(
            "--out",
            str(tmp_path / f"resumed{suffix}.pt"),
            "--resume",
            str(tmp_path / f"epoch0{suffix}"),
            "--seed",
            "1234",
        )
        for suffix in (".ckpt", ".sft")
    }
    for suffix in (".ckpt", ".sft"):
        ckpt = tmp_path / f"epoch0{suffix}"
        assert ckpt.exists()
        if suffix == ".ckpt":
            checkpoint = torch.load(ckpt, weights_only=True)  # no pickled projector objects
            state = checkpoint["optimizer_states"][0]["state"]
            assert all(torch.is_tensor(v) or isinstance(v, (int, float)) for s in state.values() for v in s.values())
            assert checkpoint["global_step"] == 5
        else:
            from lightning_utils.io import load_state

            checkpoint = load_state(ckpt)  # the whole Lightning checkpoint, optimizer state included
            assert checkpoint["global_step"] == 5
            assert checkpoint["optimizer_states"][0]["state"][0]["seed"] == 1
        _finish(running[suffix])
        resumed = torch.load(tmp_path / f"resumed{suffix}.pt", weights_only=True)
        assert sorted(resumed) == [6, 7, 8]
        for step in (6, 7, 8):
            for name, value in full[step].items():
                assert torch.equal(value, resumed[step][name]), (suffix, step, name)


def test_lightning_cli_dependency_injection_with_named_groups(tmp_path):
    """The name-based rule from YAML: OptimizerCallable + apollo_param_groups, per-step warmup."""
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (the test/cli extra)")
    from lightning.pytorch.cli import LightningCLI
    from optim_lm import InjectedTinyLM

    config = tmp_path / "injected.yaml"
    config.write_text(
        """
model:
  apollo_include: ["block.*"]
  apollo_exclude: ["*.bias"]
  optimizer:
    class_path: lightning_utils.optim.ApolloMini
    init_args: {lr: 0.02, update_proj_gap: 100}
  scheduler:
    class_path: lightning_utils.optim.WarmupLR
    init_args: {warmup_steps: 10}
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
"""
    )
    cli = LightningCLI(
        InjectedTinyLM,
        TokenData,
        run=False,
        auto_configure_optimizers=False,
        save_config_callback=None,
        args=[f"--config={config}", f"--trainer.default_root_dir={tmp_path}"],
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, ApolloMini)
    assert optimizer.param_groups[0]["param_names"] == ["block.0.weight", "block.2.weight"]
    assert optimizer.param_groups[1]["rank"] == 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * 4 / 10)  # stepped per step
    assert optimizer.state[cli.model.block[0].weight]["exp_avg"].shape == (64, 1)
