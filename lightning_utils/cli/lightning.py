"""Lightning's own subcommands (``fit``, ``validate``, ``test``, ``predict``) through LightningCLI.

What it is for: ``python -m lightning_utils.cli fit --config run.yaml`` (or the
``lightning-utils`` console script) runs :class:`lightning.pytorch.cli.LightningCLI` with every
component chosen by class path in the YAML: ``model`` (any LightningModule), ``data`` (any
LightningDataModule, optional), ``trainer`` with its ``callbacks``, ``plugins`` (e.g.
``lightning_utils.plugins.SafetensorsCheckpointIO``) and ``logger``, and ``optimizer`` /
``lr_scheduler`` (e.g. ``torch.optim.AdamW``), which LightningCLI wires into the model's
``configure_optimizers``. ``fit --ckpt_path last.sft`` also works for safetensors checkpoints,
sharded ``.sft`` directories included.

The defaults chosen here, and why:

* no fixed model or data class (``subclass_mode`` for both), so a config names its classes;
* ``save_config_kwargs={"overwrite": True}``: a rerun in the same directory rewrites the saved
  ``config.yaml`` instead of refusing to start (each run's config still lands in its log dir);
* everything else is Lightning's default (a random seed is drawn and recorded in the saved
  config unless ``seed_everything`` is set; optimizers are auto-configured).

What it must never do: import jsonargparse (an optional dependency, the ``cli`` extra) before a
Lightning subcommand runs, swallow a training error, change ``sys.argv``, or call ``sys.exit``
itself (it returns the exit code, so it can run inside another program or a test).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.imports import RequirementCache

from lightning_utils._internals import lightning_cli_class

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

__all__ = ["run_lightning_cli"]

# The same requirement Lightning checks before it builds a LightningCLI parser.
_CLI_REQUIREMENT = RequirementCache("jsonargparse[signatures]>=4.27.7")
_PROG = "lightning-utils"


def _missing_requirement_message() -> str:
    return (
        f"{_PROG}: the fit/validate/test/predict subcommands run LightningCLI, which needs "
        f"jsonargparse[signatures]>=4.27.7 ({_CLI_REQUIREMENT}).\n"
        "Install it with:  pip install 'lightning-utils[cli]'\n"
    )


@contextmanager
def _quiet_args_warning() -> Iterator[None]:
    # LightningCLI warns whenever ``args=`` is given while ``sys.argv`` has arguments; here that
    # is intended (the caller picked the arguments), so that one warning is silenced.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
        yield


def _read_safetensors_ckpt_hparams(cli: LightningCLI) -> bool:
    """Apply the model hyperparameters saved in a safetensors ``--ckpt_path`` to ``cli.config``.

    LightningCLI re-parses the model's saved hyperparameters from ``ckpt_path`` with
    ``torch.load``, which cannot read a safetensors checkpoint; this reads those through
    :mod:`lightning_utils.io` and applies them the same way. Returns False, leaving the file to
    Lightning's code, when ``ckpt_path`` is not an existing safetensors file or sharded ``.sft``
    directory. Only the header (or the sharded checkpoint's index) is read: no tensor data.
    """
    from lightning_utils.io import SAFETENSORS_SUFFIXES
    from lightning_utils.io.state import load_structure

    subcommand = cli.config.get("subcommand")
    ckpt_path = cli.config[subcommand].get("ckpt_path") if subcommand else None
    if not (ckpt_path and Path(ckpt_path).suffix.lower() in SAFETENSORS_SUFFIXES and Path(ckpt_path).exists()):
        return False
    checkpoint = load_structure(ckpt_path)
    if not (isinstance(checkpoint, dict) and "state_dict" in checkpoint and "pytorch-lightning_version" in checkpoint):
        # e.g. a weights file from ExportWeights / save_weights; Lightning would fail later with a
        # bare KeyError. parser.error prints this and exits with code 2.
        keys = sorted(map(str, checkpoint))[:5] if isinstance(checkpoint, dict) else []
        cli.parser.error(
            f"--ckpt_path {ckpt_path} is not a Lightning training checkpoint (it has no 'state_dict' and "
            f"'pytorch-lightning_version'; top-level keys: {keys}). A weights file such as ExportWeights "
            "writes cannot be resumed from; load it into the model instead."
        )
    hparams: dict[str, Any] = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    if not hparams:
        return True
    if "_class_path" in hparams:
        hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
    try:
        cli.config = cli.parser.parse_object({subcommand: {"model": hparams}}, cli.config)
    except SystemExit:
        sys.stderr.write(f"Parsing the hyperparameters saved in {ckpt_path} failed!\n")
        raise
    return True


def run_lightning_cli(argv: Sequence[str]) -> int:
    """Run LightningCLI on ``argv`` (``["fit", "--config", "run.yaml", ...]``); return the exit code.

    ``argv[0]`` is the subcommand: ``fit``, ``validate``, ``test`` or ``predict``. Argument
    errors print LightningCLI's message and give 2, ``--help`` gives 0; errors raised while
    training propagate with their traceback.

    Multi-process strategies (``--trainer.strategy ddp``) start ranks 1.. by re-running the
    current command line (``sys.argv``), so call this from a program whose command line leads
    back to the same call, as ``python -m lightning_utils.cli fit ...`` does.

    A minimal ``run.yaml``::

        seed_everything: 0
        model:
          class_path: my_project.CodecLM
          init_args: {n_q: 4, card: 1024}
        data:
          class_path: my_project.CodecData
        optimizer:
          class_path: torch.optim.AdamW
          init_args: {lr: 3.0e-4, weight_decay: 0.1}
        lr_scheduler:
          class_path: torch.optim.lr_scheduler.CosineAnnealingLR
          init_args: {T_max: 1000}
        trainer:
          max_steps: 1000
          plugins:
            - class_path: lightning_utils.plugins.SafetensorsCheckpointIO
          callbacks:
            - class_path: lightning.pytorch.callbacks.LearningRateMonitor
    """
    argv = [str(a) for a in argv]
    if not _CLI_REQUIREMENT:
        sys.stderr.write(_missing_requirement_message())
        return 2
    cli_class = lightning_cli_class(_read_safetensors_ckpt_hparams)
    # ``sys.argv`` is left alone: for DDP, Lightning starts the other ranks by re-running this
    # process's own command line, which must lead back here with the same arguments.
    args = None if argv == sys.argv[1:] else argv
    with _quiet_args_warning():
        try:
            cli_class(
                model_class=None,  # any LightningModule, by class path
                datamodule_class=None,  # any LightningDataModule, by class path, or none
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"prog": _PROG},
                args=args,
            )
        except SystemExit as exit_:  # jsonargparse exits on --help and on argument errors
            code = exit_.code
            if code is None:
                return 0
            if isinstance(code, int):
                return code
            sys.stderr.write(f"{code}\n")
            return 1
    return 0
