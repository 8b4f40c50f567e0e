"""The run-time command grammar of :class:`~lightning_utils.callbacks.TrainingControl`.

A line typed at the terminal (or written to a command file) becomes one typed, immutable
command, or a :class:`CommandError` whose message says what was wrong and what is accepted.
The grammar::

    save | export | eval | quit | eval_quit | help
    lr X            (X a finite number >= 0)
    loss_scale X    (X a finite number > 0)
    time | time to N
    event | event show | event clear
    CMD@STEP        (schedule CMD for global step STEP >= 0; exactly one '@')

Words match exactly (``reexport`` is not ``export``), case-insensitively, and any run of
whitespace separates them.

This module only parses and formats: it must never touch a trainer, read input, or raise
anything but :class:`CommandError` for bad text.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

__all__ = [
    "HELP_TEXT",
    "ClearEvents",
    "Command",
    "CommandError",
    "Eval",
    "EvalQuit",
    "Export",
    "Help",
    "Quit",
    "Save",
    "Schedule",
    "SetLR",
    "SetLossScale",
    "ShowEvents",
    "TimeLeft",
    "parse_command",
]


class CommandError(ValueError):
    """A command line that does not parse; the message names the line and the accepted form."""


@dataclass(frozen=True)
class Command:
    """Base class of every parsed command. ``str(cmd)`` is its canonical text, which parses back."""

    def __str__(self) -> str:  # pragma: no cover - every concrete command overrides it
        raise NotImplementedError


@dataclass(frozen=True)
class Save(Command):
    """Write a checkpoint now."""

    def __str__(self) -> str:
        return "save"


@dataclass(frozen=True)
class Export(Command):
    """Export the model weights now (and save a checkpoint, when ``save_on_export``)."""

    def __str__(self) -> str:
        return "export"


@dataclass(frozen=True)
class Eval(Command):
    """Run the evaluation now."""

    def __str__(self) -> str:
        return "eval"


@dataclass(frozen=True)
class Quit(Command):
    """Stop training cleanly (saving and exporting first, as configured)."""

    def __str__(self) -> str:
        return "quit"


@dataclass(frozen=True)
class EvalQuit(Command):
    """Evaluate, then quit. Before the first step it evaluates the loaded model and trains nothing."""

    def __str__(self) -> str:
        return "eval_quit"


@dataclass(frozen=True)
class Help(Command):
    """Print the grammar."""

    def __str__(self) -> str:
        return "help"


@dataclass(frozen=True)
class ShowEvents(Command):
    """List the scheduled commands."""

    def __str__(self) -> str:
        return "event show"


@dataclass(frozen=True)
class ClearEvents(Command):
    """Drop every scheduled command."""

    def __str__(self) -> str:
        return "event clear"


@dataclass(frozen=True)
class SetLR(Command):
    """Set the learning rate of every param group of every optimizer."""

    value: float

    def __str__(self) -> str:
        return f"lr {self.value!r}"


@dataclass(frozen=True)
class SetLossScale(Command):
    """Set the AMP grad scaler's loss scale."""

    value: float

    def __str__(self) -> str:
        return f"loss_scale {self.value!r}"


@dataclass(frozen=True)
class TimeLeft(Command):
    """Print the estimated time to step ``target`` (``None``: to the end of training)."""

    target: int | None = None

    def __str__(self) -> str:
        return "time" if self.target is None else f"time to {self.target}"


@dataclass(frozen=True)
class Schedule(Command):
    """Run ``command`` at the boundary of global step ``step``."""

    command: Command
    step: int

    def __str__(self) -> str:
        return f"{self.command}@{self.step}"


HELP_TEXT = """\
commands (typed at the terminal, one per line; they run at the next step boundary):
  save              write a checkpoint
  export            export the weights (.sft)
  eval              run the evaluation
  quit              stop training cleanly (saves first unless save_on_quit=False)
  eval_quit         evaluate, then quit (before the first step: evaluate only)
  lr X              set the learning rate of every param group to X (a schedule continues from it)
  loss_scale X      set the AMP loss scale to X
  time | time to N  estimated time left (to the last step, or to step N)
  CMD@STEP          run CMD at global step STEP, e.g. export@5000
  event [show]      list scheduled commands
  event clear       drop all scheduled commands
  help              this text"""

_NO_ARGUMENT = {
    "save": Save,
    "export": Export,
    "eval": Eval,
    "quit": Quit,
    "eval_quit": EvalQuit,
    "help": Help,
}
_KEYWORDS = (*_NO_ARGUMENT, "lr", "loss_scale", "time", "event")
# Digits with single '_' separators (5_000), exactly what int() accepts: a looser pattern let
# '5_' or '1__0' through to int(), whose ValueError is not a CommandError and stopped training.
_STEP = re.compile(r"[0-9]+(?:_[0-9]+)*")
_MAX_STEP_DIGITS = 19  # beyond any real step count, and far below int()'s 4300-digit limit


def _step(text: str) -> int | None:
    """The step number ``text`` spells, or ``None`` when it is not one."""
    if not _STEP.fullmatch(text) or len(text.replace("_", "")) > _MAX_STEP_DIGITS:
        return None
    return int(text)


def _number(line: str, keyword: str, args: list[str], *, positive: bool) -> float:
    bound = "> 0" if positive else ">= 0"
    if len(args) != 1:
        raise CommandError(f"{line!r}: '{keyword}' takes one number {bound}, e.g. '{keyword} 1e-4'")
    try:
        value = float(args[0])
    except ValueError:
        raise CommandError(f"{line!r}: {args[0]!r} is not a number ('{keyword} X' needs X {bound})") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise CommandError(f"{line!r}: '{keyword}' needs a finite number {bound}, got {args[0]!r}")
    return value


def _parse_simple(line: str, text: str) -> Command:
    words = text.split()
    if not words:
        raise CommandError(f"{line!r}: empty command (type 'help' for the list)")
    keyword, args = words[0].lower(), words[1:]
    if keyword in _NO_ARGUMENT:
        if args:
            raise CommandError(f"{line!r}: '{keyword}' takes no argument")
        return _NO_ARGUMENT[keyword]()
    if keyword == "lr":
        return SetLR(_number(line, keyword, args, positive=False))
    if keyword == "loss_scale":
        return SetLossScale(_number(line, keyword, args, positive=True))
    if keyword == "time":
        if not args:
            return TimeLeft()
        target = _step(args[1]) if len(args) == 2 and args[0].lower() == "to" else None
        if target is not None:
            return TimeLeft(target)
        raise CommandError(f"{line!r}: expected 'time' or 'time to N' with N a step number")
    if keyword == "event":
        sub = [a.lower() for a in args]
        if sub in ([], ["show"]):
            return ShowEvents()
        if sub == ["clear"]:
            return ClearEvents()
        raise CommandError(f"{line!r}: expected 'event', 'event show' or 'event clear'")
    close = difflib.get_close_matches(keyword, _KEYWORDS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else " (type 'help' for the list)"
    raise CommandError(f"{line!r}: unknown command '{words[0]}'{hint}")


def parse_command(line: str) -> Command:
    """Parse one line into a :class:`Command`; raise :class:`CommandError` saying what is wrong."""
    if not isinstance(line, str):
        raise CommandError(f"a command is a line of text, got {type(line).__name__}")
    if "@" not in line:
        return _parse_simple(line, line)
    parts = line.split("@")
    if len(parts) != 2:
        raise CommandError(f"{line!r}: a schedule has exactly one '@' (CMD@STEP, e.g. 'export@5000')")
    what, when = parts[0].strip(), parts[1].strip()
    if not what:
        raise CommandError(f"{line!r}: nothing to schedule before '@' (CMD@STEP, e.g. 'save@1000')")
    step = _step(when)
    if step is None:
        raise CommandError(f"{line!r}: the step after '@' must be an integer >= 0, got {when!r}")
    return Schedule(_parse_simple(line, what), step)
