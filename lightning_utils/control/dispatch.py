"""Which command triggers which action, under which flags: the rules of ``TrainingControl`` as data.

Every command of :mod:`lightning_utils.control.commands` declares, in :data:`COMMANDS`, the
actions it triggers at a step boundary and before the first step, and which ``TrainingControl``
flag (``save_on_quit``, ``export_on_quit``, ``save_on_export``) adds an action to it.
:data:`ACTION_FLAGS` holds the flags that add an action wherever another runs (``export_on_save``:
every save also exports), :data:`PERIODIC` the actions the step cadences trigger and
:data:`TRAIN_END` the one at the end of training. :func:`actions_table` renders all of it as the
table that the ``TrainingControl`` docstring and the README show (a test keeps them equal).

There are two kinds of actions. Those that change or report something (lr, loss scale, time
left, help, the schedules) act as soon as their command is read. The step-end actions
(:data:`STEP_END`: save, export, eval, quit) are collected over everything a step boundary
brings (typed commands, due schedules, cadences) and then run once each, in that order: the
checkpoint first, since it is the safest thing to have, and quitting last.

This module is data and pure functions over it: it must never touch a trainer, a model or an
optimizer, and never import ``lightning``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from lightning_utils.control.commands import (
    ClearEvents,
    Command,
    Eval,
    EvalQuit,
    Export,
    Help,
    Quit,
    Save,
    Schedule,
    SetLossScale,
    SetLR,
    ShowEvents,
    TimeLeft,
)

__all__ = [
    "ACTION_FLAGS",
    "COMMANDS",
    "PERIODIC",
    "STEP_END",
    "TRAIN_END",
    "Action",
    "ActionFlags",
    "Cadence",
    "Declared",
    "actions_at_step",
    "actions_before_first_step",
    "actions_table",
    "crossed",
    "step_end_plan",
    "train_end_actions",
]


class Action(Enum):
    """What a command, a cadence or the end of training makes ``TrainingControl`` do."""

    # act as soon as their command is read
    SCHEDULE = "schedule CMD for step STEP"
    SHOW_EVENTS = "list the schedules"
    CLEAR_EVENTS = "drop the schedules"
    HELP = "print the commands"
    TIME_LEFT = "print the time left"
    SET_LR = "set the lr"
    SET_LOSS_SCALE = "set the loss scale"
    # step-end actions
    SAVE = "save"
    EXPORT = "export"
    EVAL = "eval"
    QUIT = "quit"


STEP_END: tuple[Action, ...] = (Action.SAVE, Action.EXPORT, Action.EVAL, Action.QUIT)
"""The step-end actions, in the order they run within one step boundary."""


@dataclass(frozen=True)
class ActionFlags:
    """The ``TrainingControl`` switches that add actions; each field is the constructor argument of that name."""

    save_on_quit: bool = True
    export_on_quit: bool = False
    export_on_save: bool = False
    save_on_export: bool = True
    save_on_train_end: bool = True

    def __getitem__(self, flag: str) -> bool:
        return bool(getattr(self, flag))


@dataclass(frozen=True)
class Declared:
    """What one command triggers.

    ``actions``: at a step boundary, always. ``flagged``: ``(flag, action)`` pairs, each action
    added at a step boundary when that :class:`ActionFlags` flag is on. ``before_first_step``:
    the actions before the first step (flags never add any there); ``()`` means the command is
    ignored then, because nothing was trained yet. ``text``: how the table names the command.
    """

    command: type[Command]
    text: str
    actions: tuple[Action, ...]
    before_first_step: tuple[Action, ...]
    flagged: tuple[tuple[str, Action], ...] = ()


_ON_QUIT = (("save_on_quit", Action.SAVE), ("export_on_quit", Action.EXPORT))

COMMANDS: tuple[Declared, ...] = (
    Declared(Save, "`save`", (Action.SAVE,), before_first_step=()),
    Declared(Export, "`export`", (Action.EXPORT,), before_first_step=(), flagged=(("save_on_export", Action.SAVE),)),
    Declared(Eval, "`eval`", (Action.EVAL,), before_first_step=(Action.EVAL,)),
    Declared(Quit, "`quit`", (Action.QUIT,), before_first_step=(Action.QUIT,), flagged=_ON_QUIT),
    Declared(
        EvalQuit,
        "`eval_quit`",
        (Action.EVAL, Action.QUIT),
        before_first_step=(Action.EVAL, Action.QUIT),
        flagged=_ON_QUIT,
    ),
    Declared(SetLR, "`lr X`", (Action.SET_LR,), before_first_step=(Action.SET_LR,)),
    Declared(SetLossScale, "`loss_scale X`", (Action.SET_LOSS_SCALE,), before_first_step=(Action.SET_LOSS_SCALE,)),
    Declared(TimeLeft, "`time`, `time to N`", (Action.TIME_LEFT,), before_first_step=(Action.TIME_LEFT,)),
    Declared(ShowEvents, "`event`, `event show`", (Action.SHOW_EVENTS,), before_first_step=(Action.SHOW_EVENTS,)),
    Declared(ClearEvents, "`event clear`", (Action.CLEAR_EVENTS,), before_first_step=(Action.CLEAR_EVENTS,)),
    Declared(Help, "`help`", (Action.HELP,), before_first_step=(Action.HELP,)),
    Declared(Schedule, "`CMD@STEP`", (Action.SCHEDULE,), before_first_step=(Action.SCHEDULE,)),
)
"""Every command and what it triggers."""

_BY_TYPE: dict[type[Command], Declared] = {declared.command: declared for declared in COMMANDS}

ACTION_FLAGS: tuple[tuple[str, Action, Action], ...] = (("export_on_save", Action.SAVE, Action.EXPORT),)
"""``(flag, action, added)``: with that flag on, every ``action`` (whatever triggered it) brings ``added``."""

PERIODIC: tuple[tuple[str, Action], ...] = (
    ("save_every_n_steps", Action.SAVE),
    ("export_every_n_steps", Action.EXPORT),
    ("eval_every_n_steps", Action.EVAL),
)
"""``(cadence, action)``: the action runs at every step boundary that reaches a multiple of that cadence."""

TRAIN_END: tuple[tuple[str, Action], ...] = (("save_on_train_end", Action.SAVE),)
"""``(flag, action)``: what the end of training triggers when the flag is on, unless the run was
ended by ``quit`` or a checkpoint of the last step was already written."""


def _every(value: int | None, name: str) -> int | None:
    if value is None or value == 0:  # 0 means "never", like None
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a positive integer, 0 or None, got {value!r}")
    return value


def crossed(every: int | None, previous: int, step: int) -> bool:
    """Whether a multiple of ``every`` lies in ``(previous, step]`` (so a jump of 2+ steps counts too)."""
    return every is not None and step // every > previous // every


@dataclass(frozen=True)
class Cadence:
    """The periodic actions, every N optimizer steps (``None``: never); see :data:`PERIODIC`.

    Build it with :meth:`of`, which checks the numbers and makes saves follow the eval cadence
    when no save cadence is given.
    """

    save_every_n_steps: int | None = None
    eval_every_n_steps: int | None = None
    export_every_n_steps: int | None = None

    @classmethod
    def of(
        cls, save_every_n_steps: int | None, eval_every_n_steps: int | None, export_every_n_steps: int | None
    ) -> Cadence:
        """``None`` or 0 is "never"; a missing save cadence falls back to the eval cadence."""
        evaluate = _every(eval_every_n_steps, "eval_every_n_steps")
        return cls(
            save_every_n_steps=_every(save_every_n_steps, "save_every_n_steps") or evaluate,
            eval_every_n_steps=evaluate,
            export_every_n_steps=_every(export_every_n_steps, "export_every_n_steps"),
        )

    def due(self, previous: int, step: int) -> set[Action]:
        """The periodic actions of a step boundary that moved from ``previous`` to ``step``."""
        return {action for cadence, action in PERIODIC if crossed(getattr(self, cadence), previous, step)}


def actions_at_step(command: Command, flags: ActionFlags) -> tuple[Action, ...]:
    """The actions ``command`` triggers at a step boundary, with those its flags add."""
    declared = _BY_TYPE[type(command)]
    return declared.actions + tuple(action for flag, action in declared.flagged if flags[flag])


def actions_before_first_step(command: Command) -> tuple[Action, ...]:
    """The actions ``command`` triggers before the first step (``()``: it is ignored then)."""
    return _BY_TYPE[type(command)].before_first_step


def train_end_actions(flags: ActionFlags) -> set[Action]:
    """The actions the end of training triggers (see :data:`TRAIN_END`)."""
    return {action for flag, action in TRAIN_END if flags[flag]}


def step_end_plan(wanted: Iterable[Action], flags: ActionFlags) -> tuple[Action, ...]:
    """The step-end actions to run for ``wanted``, with those :data:`ACTION_FLAGS` add, once each, in :data:`STEP_END` order."""
    chosen = set(wanted)
    chosen |= {added for flag, action, added in ACTION_FLAGS if flags[flag] and action in chosen}
    return tuple(action for action in STEP_END if action in chosen)


def _describe(actions: tuple[Action, ...], flagged: Iterable[tuple[str, Action]] = ()) -> str:
    parts = [", ".join(action.value for action in actions)]
    parts += [f"{action.value} if `{flag}`" for flag, action in flagged]
    return "; ".join(parts)


def actions_table() -> str:
    """The rules above as a Markdown table with its notes (shown in the docstring and the README)."""
    rows = [
        "| command or trigger | at a step boundary | before the first step |",
        "|---|---|---|",
    ]
    for d in COMMANDS:
        before = _describe(d.before_first_step) if d.before_first_step else "ignored: nothing was trained yet"
        rows.append(f"| {d.text} | {_describe(d.actions, d.flagged)} | {before} |")
    for cadence, action in PERIODIC:
        fallback = " (unset: `eval_every_n_steps`)" if cadence == "save_every_n_steps" else ""
        rows.append(f"| every `{cadence}` steps{fallback} | {action.value} | - |")
    for flag, action in TRAIN_END:
        rows.append(
            f"| end of training, if `{flag}` (not after `quit`, nor when that step was saved; when `max_steps` "
            f"ends the run, at its last step boundary) | {action.value} | - |"
        )
    notes = [
        f"With `{flag}`, every {action.value} (whatever triggered it) also runs {added.value}."
        for flag, action, added in ACTION_FLAGS
    ]
    notes.append(
        f"{', '.join(a.value for a in STEP_END[:-1])} and {STEP_END[-1].value} run once each per step boundary, in "
        "that order, after all the commands of that step were read; the other actions act as their command is read."
    )
    notes.append(
        "A schedule runs at the boundary of step STEP (typed at that very boundary: at once); one for a step "
        "already passed, the current one before the first step included, is reported and dropped."
    )
    items = [textwrap.fill(note, width=96, initial_indent="- ", subsequent_indent="  ") for note in notes]
    return "\n".join(rows) + "\n\n" + "\n".join(items)
