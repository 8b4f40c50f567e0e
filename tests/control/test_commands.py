"""The command grammar: typed commands, exact words, whitespace tolerance, clear errors."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_utils.control.commands import (
    ClearEvents,
    CommandError,
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
    parse_command,
)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("save", Save()),
        ("  SAVE \t", Save()),
        ("export", Export()),
        ("eval", Eval()),
        ("quit", Quit()),
        ("eval_quit", EvalQuit()),
        ("help", Help()),
        ("lr 1e-4", SetLR(1e-4)),
        ("lr   0.5  ", SetLR(0.5)),
        ("lr 0", SetLR(0.0)),
        ("loss_scale 1024", SetLossScale(1024.0)),
        ("time", TimeLeft()),
        ("time to 5000", TimeLeft(5000)),
        ("time  TO  5_000", TimeLeft(5000)),
        ("event", ShowEvents()),
        ("event show", ShowEvents()),
        ("event   clear", ClearEvents()),
        ("export@5000", Schedule(Export(), 5000)),
        ("save @ 0", Schedule(Save(), 0)),
        ("lr 1e-4@300", Schedule(SetLR(1e-4), 300)),
        ("eval_quit@7", Schedule(EvalQuit(), 7)),
    ],
)
def test_parses(line, expected):
    assert parse_command(line) == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("reexport", "unknown command 'reexport' (did you mean 'export'?)"),  # no substring match
        ("savefile", "unknown command"),
        ("lrx 3", "unknown command"),
        ("times", "unknown command"),
        ("garbage", "unknown command 'garbage' (type 'help' for the list)"),
        ("lr abc", "'abc' is not a number"),
        ("lr", "'lr' takes one number"),
        ("lr 1 2", "'lr' takes one number"),
        ("lr -1", "finite number >= 0"),
        ("lr inf", "finite number >= 0"),
        ("lr nan", "finite number >= 0"),
        ("loss_scale 0", "finite number > 0"),
        ("save now", "'save' takes no argument"),
        ("quit 3", "'quit' takes no argument"),
        ("time 5", "expected 'time' or 'time to N'"),
        ("time to -5", "expected 'time' or 'time to N'"),
        ("event foo", "expected 'event', 'event show' or 'event clear'"),
        ("a@b@c", "exactly one '@'"),
        ("save@-3", "integer >= 0, got '-3'"),
        ("save@1.5", "integer >= 0"),
        ("save@", "integer >= 0"),
        ("save@5_", "integer >= 0, got '5_'"),  # int() refuses a trailing or doubled '_'
        ("save@1__0", "integer >= 0"),
        ("save@" + "1" * 5000, "integer >= 0"),  # past Python's int-string digit limit
        ("time to 5_", "expected 'time' or 'time to N'"),
        ("time to " + "9" * 5000, "expected 'time' or 'time to N'"),
        ("@5", "nothing to schedule"),
        ("bogus@5", "unknown command 'bogus'"),
        ("", "empty command"),
        ("   ", "empty command"),
    ],
)
def test_errors_say_what_is_wrong(line, message):
    with pytest.raises(CommandError) as info:
        parse_command(line)
    assert message in str(info.value)
    assert repr(line)[:40] in str(info.value)  # the message names the line


def test_command_error_is_a_value_error():
    assert issubclass(CommandError, ValueError)
    with pytest.raises(CommandError, match="line of text"):
        parse_command(3)  # type: ignore[arg-type]


_commands = st.one_of(
    st.sampled_from([Save(), Export(), Eval(), Quit(), EvalQuit(), Help(), ShowEvents(), ClearEvents(), TimeLeft()]),
    st.builds(SetLR, st.floats(min_value=0, max_value=1e3, allow_nan=False)),
    st.builds(SetLossScale, st.floats(min_value=1e-3, max_value=1e9, allow_nan=False)),
    st.builds(TimeLeft, st.integers(0, 10**9)),
)


@given(_commands, st.one_of(st.none(), st.integers(0, 10**9)))
def test_canonical_text_parses_back(cmd, step):
    if step is not None:
        cmd = Schedule(cmd, step)
    assert parse_command(str(cmd)) == cmd


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_command_error(text):
    with contextlib.suppress(CommandError):
        parse_command(text)


@given(st.from_regex(r"\A(save|time to )[ 0-9_]{0,12}(@[ 0-9_]{0,12})?\Z"))
def test_digit_and_underscore_mixes_never_raise_anything_but_command_error(text):
    with contextlib.suppress(CommandError):
        parse_command(text)
