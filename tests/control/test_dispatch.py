"""The command -> action rules as data: every command declared, flags that exist, the plans, and
the table the README shows."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from lightning_utils.control import commands as grammar
from lightning_utils.control.commands import Command, parse_command
from lightning_utils.control.dispatch import (
    ACTION_FLAGS,
    COMMANDS,
    PERIODIC,
    STEP_END,
    TRAIN_END,
    Action,
    ActionFlags,
    Cadence,
    actions_at_step,
    actions_before_first_step,
    actions_table,
    crossed,
    step_end_plan,
    train_end_actions,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_command_of_the_grammar_declares_its_actions_once():
    concrete = {
        obj
        for obj in vars(grammar).values()
        if inspect.isclass(obj) and issubclass(obj, Command) and obj is not Command
    }
    declared = [d.command for d in COMMANDS]
    assert sorted(declared, key=lambda c: c.__name__) == sorted(concrete, key=lambda c: c.__name__)
    assert len(set(declared)) == len(declared)


def test_every_flag_named_is_a_field_of_action_flags_and_every_cadence_one_of_cadence():
    flags = {f.name for f in dataclasses.fields(ActionFlags)}
    named = {flag for d in COMMANDS for flag, _ in d.flagged}
    named |= {flag for flag, _, _ in ACTION_FLAGS} | {flag for flag, _ in TRAIN_END}
    assert named == flags
    assert {cadence for cadence, _ in PERIODIC} == {f.name for f in dataclasses.fields(Cadence)}
    # that they are TrainingControl's arguments, with the same defaults: tests/callbacks/test_training_control.py


def test_step_end_actions_are_never_at_once_and_the_others_never_wait():
    at_once = [a for a in Action if a not in STEP_END]
    assert set(STEP_END) | set(at_once) == set(Action)
    assert STEP_END == (Action.SAVE, Action.EXPORT, Action.EVAL, Action.QUIT)  # checkpoint first, quit last


@pytest.mark.parametrize(
    ("line", "flags", "expected"),
    [
        ("save", ActionFlags(), (Action.SAVE,)),
        ("export", ActionFlags(), (Action.EXPORT, Action.SAVE)),
        ("export", ActionFlags(save_on_export=False), (Action.EXPORT,)),
        ("quit", ActionFlags(), (Action.QUIT, Action.SAVE)),
        ("quit", ActionFlags(save_on_quit=False, export_on_quit=True), (Action.QUIT, Action.EXPORT)),
        ("eval_quit", ActionFlags(export_on_quit=True), (Action.EVAL, Action.QUIT, Action.SAVE, Action.EXPORT)),
        ("lr 0.1", ActionFlags(), (Action.SET_LR,)),
        ("save@5", ActionFlags(), (Action.SCHEDULE,)),
        ("event", ActionFlags(), (Action.SHOW_EVENTS,)),
    ],
)
def test_actions_at_a_step_boundary(line, flags, expected):
    assert actions_at_step(parse_command(line), flags) == expected


def test_before_the_first_step_saves_and_exports_are_ignored_and_flags_add_nothing():
    assert actions_before_first_step(parse_command("save")) == ()
    assert actions_before_first_step(parse_command("export")) == ()
    assert actions_before_first_step(parse_command("quit")) == (Action.QUIT,)  # no save_on_quit: nothing trained
    assert actions_before_first_step(parse_command("eval_quit")) == (Action.EVAL, Action.QUIT)
    assert actions_before_first_step(parse_command("lr 0.5")) == (Action.SET_LR,)


def test_step_end_plan_runs_each_once_in_order_and_export_on_save_follows_every_save():
    wanted = [Action.QUIT, Action.EVAL, Action.SAVE, Action.SAVE]
    assert step_end_plan(wanted, ActionFlags()) == (Action.SAVE, Action.EVAL, Action.QUIT)
    assert step_end_plan(wanted, ActionFlags(export_on_save=True)) == (
        Action.SAVE,
        Action.EXPORT,
        Action.EVAL,
        Action.QUIT,
    )
    assert step_end_plan([Action.EVAL], ActionFlags(export_on_save=True)) == (Action.EVAL,)
    assert step_end_plan([], ActionFlags()) == ()


def test_train_end_saves_only_with_its_flag():
    assert train_end_actions(ActionFlags()) == {Action.SAVE}
    assert train_end_actions(ActionFlags(save_on_train_end=False)) == set()


def test_cadence_checks_its_numbers_and_saves_follow_the_eval_cadence():
    assert Cadence.of(None, 4, 0) == Cadence(save_every_n_steps=4, eval_every_n_steps=4, export_every_n_steps=None)
    assert Cadence.of(0, 4, None).save_every_n_steps == 4
    assert Cadence.of(5, None, 3) == Cadence(5, None, 3)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="save_every_n_steps"):
            Cadence.of(bad, None, None)
    cadence = Cadence(save_every_n_steps=5, eval_every_n_steps=4, export_every_n_steps=None)
    assert cadence.due(3, 4) == {Action.EVAL}
    assert cadence.due(4, 5) == {Action.SAVE}
    assert cadence.due(18, 20) == {Action.SAVE, Action.EVAL}  # a jump of two steps still crosses 20
    assert cadence.due(20, 21) == set()


def test_crossed_counts_a_multiple_in_the_half_open_interval():
    assert crossed(5, 4, 5) and crossed(5, 4, 7) and crossed(5, 9, 11)
    assert not crossed(5, 5, 9) and not crossed(None, 0, 100)


def test_the_readme_shows_exactly_this_table():
    text = README.read_text()
    section = text[text.index("## Steering a run") :]
    section = section[: section.index("\n## ", 1)]
    assert actions_table() in section, "README.md's table differs from lightning_utils.control.dispatch; paste:\n" + (
        actions_table()
    )
