"""The ``lightning-utils`` command line.

Subcommands each live in their own module of this package and expose two functions:
``add_arguments(parser)`` and ``run(args) -> int`` (the exit code). The table below maps names
to modules; only the module of the subcommand being run is imported, so neither torch nor an
optional back end (matplotlib, jsonargparse) is loaded by a subcommand that does not need it.

Lightning's own subcommands (``fit``, ``validate``, ``test``, ``predict``) are handed to
``LightningCLI`` (see :mod:`lightning_utils.cli.lightning`), so
``python -m lightning_utils.cli fit --config run.yaml`` works with every component chosen by
class path.

What it must never do: import torch, Lightning or an optional back end at import time (``--help``
and ``plot`` stay fast and work without them), or exit the interpreter itself: :func:`main`
returns the exit code and only the entry points (``__main__``, the console script) exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("lightning_utils.cli.inspect", "show the tree of a .sft/.ckpt checkpoint"),
    "convert": ("lightning_utils.cli.convert", "convert a checkpoint between .ckpt/.pt and .sft"),
    "plot": ("lightning_utils.cli.plot", "draw metrics from a MetricsPrinter JSON-lines file against step"),
}
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (to add its arguments)."""
    parser = argparse.ArgumentParser(
        prog="lightning-utils",
        description="Tools for lightning-utils checkpoints and runs. "
        f"Also: {', '.join(LIGHTNING_SUBCOMMANDS)} (handed to LightningCLI).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        from lightning_utils.cli.lightning import run_lightning_cli

        return run_lightning_cli(argv)
    parser = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":  # pragma: no cover - exercised through subprocess tests
    sys.exit(main())
