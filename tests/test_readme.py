"""Every code block of README.md runs as written (or a named test runs it), and every command in a
shell block is one a test runs."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.readme import README, Block, blocks

ROOT = README.parent
# Sections whose code another test runs, on what it needs (a checkpoint of the block's own module,
# an S3 server); that test reads the block out of README.md itself.
RUN_ELSEWHERE = {
    "In a Trainer#mixin": "tests/plugins/test_mixin_load_from_checkpoint.py",
    "Checkpoints on object storage": "tests/io/test_remote_state.py",
    "Exporting weights": "tests/callbacks/test_export_readme.py",
}
# Each shell command of the README, by its first words, and the test that runs it.
COMMANDS = {
    "make demo": "tests/examples/test_example.py (the demo script make demo runs) and CI (make test)",
    "make test": "CI runs make test itself",
    "python examples/train_codec_lm.py fit --config": "tests/examples/test_example.py",
    "PYTHONPATH=examples python -m lightning_utils.cli fit --config examples/configs/codec_lm.yaml": (
        "tests/examples/test_example.py"
    ),
    "PYTHONPATH=examples python -m lightning_utils.cli fit --config run.yaml": "tests/test_readme.py",
    "lightning-utils inspect": "tests/cli/test_cli_io.py",
    "lightning-utils convert": "tests/cli/test_cli_io.py",
    "lightning-utils plot": "tests/cli/test_plot.py",
    "python train.py fit --optimizer lightning_utils.optim.ApolloMini": "tests/optim/test_optim_lightning.py",
}


def _key(block: Block) -> str:
    return f"{block.section}#mixin" if "SafetensorsLoadMixin" in block.code else block.section


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "examples")])}


PYTHON = [b for b in blocks() if b.language == "python"]


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    elsewhere = RUN_ELSEWHERE.get(_key(block))
    if elsewhere is not None:
        test = ROOT / elsewhere
        assert test.is_file() and "README" in test.read_text(), f"{elsewhere} should run README.md line {block.line}"
        return
    script = tmp_path / "block.py"
    script.write_text(block.code)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"README.md line {block.line} ({block.section}) failed:\n{done.stderr[-3000:]}"


def test_lightning_cli_config_and_commands_run_as_written(tmp_path: Path) -> None:
    section = [b for b in blocks() if b.section.startswith("LightningCLI")]
    (yaml,) = [b for b in section if b.language == "yaml"]
    (shell,) = [b for b in section if b.language == "bash"]
    (tmp_path / "run.yaml").write_text(yaml.code)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    for line in shell.code.splitlines():
        command = line.split("#")[0].strip()
        words = shlex.split(command)
        env = {**os.environ, **dict(w.split("=", 1) for w in words if "=" in w.split("/")[0])}
        argv = [sys.executable if w == "python" else w for w in words if "=" not in w.split("/")[0]]
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "examples"), str(ROOT)])
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, f"{command}:\n{done.stderr[-3000:]}"
    assert (tmp_path / "ckpts" / "last.sft").is_file()
    from lightning_utils.io import load_state

    assert load_state(tmp_path / "ckpts" / "last.sft")["global_step"] == 30


def test_every_shell_command_is_run_by_a_test() -> None:
    for block in blocks():
        if block.language != "bash":
            continue
        for line in block.code.splitlines():
            command = line.split("#")[0].strip()
            if not command or command.startswith(("--", "\\")):
                continue
            covered = [test for prefix, test in COMMANDS.items() if command.startswith(prefix)]
            assert covered, f"README.md line {block.line}: no test runs `{command}`; add one and list it in COMMANDS"
            for test in covered:
                path = test.split(" ")[0]
                if path.startswith("tests/"):
                    assert (ROOT / path).is_file(), path
