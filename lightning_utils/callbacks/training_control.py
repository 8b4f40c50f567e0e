"""``TrainingControl``: steer a running ``fit`` (save, eval, export, lr, quit, schedules) and run
periodic save/eval/export, all at step boundaries and identically on every rank.

Commands come from standard input (the default), a command file or FIFO, or a signal
(:mod:`lightning_utils.control.sources`), and follow the grammar of
:mod:`lightning_utils.control.commands`. Global rank 0 reads; at each optimizer-step boundary
(``on_train_batch_end`` after ``global_step`` moved) the lines it received are broadcast
through :func:`lightning_utils.distributed.broadcast_object` (the strategy's broadcast), so
every rank runs the same commands at the same step and collective work
(``trainer.save_checkpoint``, gathering weights for an export) lines up. Which command triggers
which action, under which flags, is the data of :mod:`lightning_utils.control.dispatch`; the lr,
loss-scale and time-left computations are :mod:`lightning_utils.control.actions`. This module
holds the hooks and the actions that need the trainer (save, export, eval, quit).

Each save, export and eval ends with every rank reporting whether its part failed (a small
all-reduce, and the errors gathered only when one failed): a failure on one rank then ends
every rank with a :class:`ControlError` naming that rank and its error, where it would
otherwise leave the other ranks waiting in the next collective. A save also keeps the ``last``
file of each ``ModelCheckpoint(save_last=...)`` pointing at it (:mod:`lightning_utils.control.last`),
so ``fit(ckpt_path="last")`` restores the latest checkpoint written.

This callback must never act from a reader thread or a signal handler, never block the
training thread on input, never let a bad command stop training (bad commands are reported
on the log and ignored), and never let ranks leave a step boundary having run different
collectives.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_utils import _internals
from lightning_utils.control.actions import StepClock, last_step, set_loss_scale, set_lr, time_left
from lightning_utils.control.commands import HELP_TEXT, Command, CommandError, Schedule, parse_command
from lightning_utils.control.dispatch import (
    STEP_END,
    Action,
    ActionFlags,
    Cadence,
    actions_at_step,
    actions_before_first_step,
    step_end_plan,
    train_end_actions,
)
from lightning_utils.control.last import copy_last, link_last
from lightning_utils.control.sources import CommandSource, SignalFlag, resolve_source
from lightning_utils.distributed import all_gather_object, broadcast_object
from lightning_utils.io import storage

__all__ = ["ControlError", "TrainingControl"]

log = logging.getLogger(__name__)

EvalFn = Callable[[Trainer, LightningModule], Any]


class ControlError(RuntimeError):
    """A save, export or evaluation that failed on one rank, raised on every rank (naming that rank)."""


def _make_log_visible() -> None:
    # Command answers ("lr set to ...") are for the person at the terminal, so INFO must show
    # even when the application configured no logging; Lightning does the same for its logger.
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if not log.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[training control] %(message)s"))
        log.addHandler(handler)


def _setting(group: str, name: str) -> Any:
    """A read-only attribute for a constructor argument kept in one of the grouped settings."""
    return property(lambda self: getattr(getattr(self, group), name), doc=f"``{group}.{name}``")


@dataclass
class _Reading:
    """The commands read at one point of the run: before the first step, or at the boundary of ``step``."""

    step: int
    first_open_step: int  # the first step a schedule can still run at (the current one at a boundary)
    wanted: set[Action] = field(default_factory=set)  # the step-end actions asked for so far
    due: list[Command] = field(default_factory=list)  # commands scheduled for this very step while reading


class TrainingControl(Callback):
    r"""Run-time commands and periodic save/eval/export for ``Trainer.fit``.

    Type into the terminal while training runs (or write into ``source``)::

        save | export | eval | quit | eval_quit | lr 1e-4 | loss_scale 1024 | time | time to 5000
        export@5000 | event | event clear | help

    What each command and trigger does (:mod:`lightning_utils.control.dispatch` holds this as data):

    | command or trigger | at a step boundary | before the first step |
    |---|---|---|
    | `save` | save | ignored: nothing was trained yet |
    | `export` | export; save if `save_on_export` | ignored: nothing was trained yet |
    | `eval` | eval | eval |
    | `quit` | quit; save if `save_on_quit`; export if `export_on_quit` | quit |
    | `eval_quit` | eval, quit; save if `save_on_quit`; export if `export_on_quit` | eval, quit |
    | `lr X` | set the lr | set the lr |
    | `loss_scale X` | set the loss scale | set the loss scale |
    | `time`, `time to N` | print the time left | print the time left |
    | `event`, `event show` | list the schedules | list the schedules |
    | `event clear` | drop the schedules | drop the schedules |
    | `help` | print the commands | print the commands |
    | `CMD@STEP` | schedule CMD for step STEP | schedule CMD for step STEP |
    | every `save_every_n_steps` steps (unset: `eval_every_n_steps`) | save | - |
    | every `export_every_n_steps` steps | export | - |
    | every `eval_every_n_steps` steps | eval | - |
    | end of training, if `save_on_train_end` (not after `quit`, nor when that step was saved; when `max_steps` ends the run, at its last step boundary) | save | - |

    - With `export_on_save`, every save (whatever triggered it) also runs export.
    - save, export, eval and quit run once each per step boundary, in that order, after all the
      commands of that step were read; the other actions act as their command is read.
    - A schedule runs at the boundary of step STEP (typed at that very boundary: at once); one for a
      step already passed, the current one before the first step included, is reported and dropped.

    Args:
        source: ``"stdin"`` (default), a command file or FIFO path (``echo save >> PATH``),
            a :class:`~lightning_utils.control.sources.CommandSource`, or ``None`` (no reader:
            schedules, the signal and periodic work only). Only global rank 0 reads. A command
            file is read like ``tail -f``: the lines already in it when ``fit`` starts belong to
            an earlier run and are skipped (a resumed run does not replay them); give commands
            for the start of a run with ``commands=``.
        save_every_n_steps: periodic checkpoint every N optimizer steps. ``None``/0 falls back
            to ``eval_every_n_steps``; both ``None``: no periodic save.
        eval_every_n_steps: periodic evaluation every N steps.
        export_every_n_steps: periodic weights export every N steps (no checkpoint).
        save_on_quit: ``quit`` writes a checkpoint first.
        export_on_quit: ``quit`` exports the weights (independently of ``save_on_quit``).
        export_on_save: export the weights with every checkpoint this callback writes.
        save_on_export: the ``export`` command also writes a checkpoint.
        save_on_train_end: write a final checkpoint when training ends, unless one was written
            at that step or the run was ended by ``quit`` (then ``save_on_quit`` decides). When
            ``max_steps`` ends the run it is written at the last step boundary, so it resumes
            mid-epoch exactly like every other checkpoint of this callback.
        dirpath: checkpoint folder. Default: the ``ModelCheckpoint``'s folder if there is one,
            else ``<default_root_dir>/checkpoints``.
        filename: checkpoint name template (``{step}``, ``{epoch}``). Default ``"step={step}"``.
        file_extension: e.g. ``".sft"``. Default: the ``ModelCheckpoint``'s ``FILE_EXTENSION`` when
            it is not ``".ckpt"`` (``SafetensorsModelCheckpoint``: ``".sft"``), else ``".sft"`` when
            the trainer uses ``SafetensorsCheckpointIO``, else ``".ckpt"``.
        eval_fn: ``eval_fn(trainer, pl_module)`` runs the evaluation on **every** rank (wrap it
            in :func:`lightning_utils.distributed.global_leader_only` for rank 0 only). Default:
            one pass of the model's own validation loop, like ``val_check_interval`` would.
        exporter: the :class:`~lightning_utils.callbacks.ExportWeights` used for exports.
            Default: the one in ``trainer.callbacks``, else a default ``ExportWeights()``.
        signal: a signal name or number (default ``"SIGUSR1"``) whose arrival runs
            ``signal_command`` at the next step boundary; ``None`` installs no handler. The
            handler (it only sets a flag) is installed on every rank from the sanity check or
            the start of training, and the previous one is back when ``fit`` returns or fails.
        signal_command: the command a signal triggers (default ``"save"``).
        check_every_n_steps: read and broadcast commands every N steps (a broadcast is a
            collective; raise this when steps are very short). Schedules and periodic work
            still happen at their exact steps.
        commands: lines run as if typed before the first step, e.g. ``["export@5000",
            "quit@20000"]`` (checked at construction; a schedule restored from a checkpoint is
            not added twice).

    Steps are optimizer steps (``trainer.global_step``): with gradient accumulation, commands
    run once per step, not once per micro-batch. Pending schedules and the last save/eval/export
    steps are saved in checkpoints; right after a resume nothing is re-saved at the resumed step.
    The cadences are kept in :attr:`cadence` and the switches in :attr:`flags`; read-only
    attributes named like the constructor arguments (``save_on_quit``...) read them.
    """

    save_every_n_steps = _setting("cadence", "save_every_n_steps")
    eval_every_n_steps = _setting("cadence", "eval_every_n_steps")
    export_every_n_steps = _setting("cadence", "export_every_n_steps")
    save_on_quit = _setting("flags", "save_on_quit")
    export_on_quit = _setting("flags", "export_on_quit")
    export_on_save = _setting("flags", "export_on_save")
    save_on_export = _setting("flags", "save_on_export")
    save_on_train_end = _setting("flags", "save_on_train_end")

    def __init__(
        self,
        source: str | os.PathLike[str] | CommandSource | None = "stdin",
        save_every_n_steps: int | None = None,
        eval_every_n_steps: int | None = None,
        export_every_n_steps: int | None = None,
        save_on_quit: bool = True,
        export_on_quit: bool = False,
        export_on_save: bool = False,
        save_on_export: bool = True,
        save_on_train_end: bool = True,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str = "step={step}",
        file_extension: str | None = None,
        eval_fn: EvalFn | None = None,
        exporter: Any | None = None,
        signal: str | int | None = "SIGUSR1",
        signal_command: str = "save",
        check_every_n_steps: int = 1,
        commands: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.source: CommandSource | None = resolve_source(source)
        self.cadence = Cadence.of(save_every_n_steps, eval_every_n_steps, export_every_n_steps)
        self.flags = ActionFlags(
            save_on_quit=bool(save_on_quit),
            export_on_quit=bool(export_on_quit),
            export_on_save=bool(export_on_save),
            save_on_export=bool(save_on_export),
            save_on_train_end=bool(save_on_train_end),
        )
        self.dirpath = storage.path_or_url(dirpath) if dirpath is not None else None
        try:
            filename.format(step=0, epoch=0)
        except (KeyError, IndexError, ValueError, AttributeError) as err:
            raise ValueError(f"filename {filename!r}: only {{step}} and {{epoch}} can be filled in ({err})") from None
        self.filename = filename
        if file_extension is not None and not file_extension.startswith("."):
            raise ValueError(f"file_extension must start with '.', e.g. '.sft'; got {file_extension!r}")
        self.file_extension = file_extension
        if eval_fn is not None and not callable(eval_fn):
            raise TypeError(f"eval_fn must be callable as eval_fn(trainer, pl_module), got {type(eval_fn).__name__}")
        self.eval_fn = eval_fn
        self.exporter = exporter
        try:
            self.signal_command: Command = parse_command(signal_command)
        except CommandError as err:
            raise ValueError(f"signal_command: {err}") from None
        self._signal = SignalFlag(signal) if signal is not None else None  # ValueError names a bad signal
        if not isinstance(check_every_n_steps, int) or check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be an integer >= 1, got {check_every_n_steps!r}")
        self.check_every_n_steps = check_every_n_steps
        if isinstance(commands, str):
            commands = [commands]
        for i, line in enumerate(commands):
            try:
                parse_command(line)
            except CommandError as err:
                raise ValueError(f"commands[{i}]: {err}") from None
        self.commands = list(commands)

        # state (saved in checkpoints)
        self.events: list[tuple[Command, int]] = []
        self.last_save_step: int | None = None
        self.last_eval_step: int | None = None
        self.last_export_step: int | None = None
        # run-time only
        self.last_checkpoint_path: Path | str | None = None
        self.quit_requested = False
        self._boundary_step = 0
        self._is_leader = True
        self._ckpt_dir: str | None = None
        self._clock = StepClock(window=100)
        self._exporter: Any | None = None
        self._reader_started = False
        self._handle_signal = False

    # ------------------------------------------------------------------------------------------
    # Lightning hooks
    # ------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._is_leader = trainer.is_global_zero
        _make_log_visible()
        if self.file_extension is not None and self.file_extension.lower() in (".sft", ".safetensors"):
            # A '.sft' name must hold a safetensors file, never a torch pickle: make the trainer
            # write through SafetensorsCheckpointIO (as SafetensorsModelCheckpoint does).
            from lightning_utils.plugins.checkpoint_io import ensure_safetensors_checkpoint_io
            from lightning_utils.plugins.module_loading import check_strategy_writes_through_checkpoint_io

            check_strategy_writes_through_checkpoint_io(trainer.strategy, self.file_extension)
            ensure_safetensors_checkpoint_io(trainer.strategy)
        self._handle_signal = self._signal is not None and not self._is_slurm_requeue_signal(trainer)
        if self._is_leader and self.source is not None:
            self.source.start()
            self._reader_started = True

    def _is_slurm_requeue_signal(self, trainer: Trainer) -> bool:
        """Lightning's SLURM auto-requeue owns its requeue signal (SIGUSR1 by default): leave it."""
        assert self._signal is not None
        env = _internals.cluster_environment(trainer)
        if not getattr(env, "auto_requeue", False):
            return False
        requeue = getattr(env, "requeue_signal", None)
        if requeue is None or int(requeue) != self._signal.signum:
            return False
        self._warn(
            f"{self._signal.name} is Lightning's SLURM auto-requeue signal, so TrainingControl does not "
            "handle it; pass TrainingControl(signal='SIGUSR2') (or another free signal) for on-demand saves"
        )
        return True

    def _install_signal(self) -> None:
        # Every rank gets the handler: a signal sent to the whole job must not kill rank 1 with
        # SIGUSR1's default action. Only rank 0's flag is broadcast. Installed only once Lightning's
        # signal connector has recorded the process's handlers (after setup/on_fit_start): on a
        # failed fit Lightning re-installs what it recorded *after* our on_exception, so had ours
        # been recorded, it would stay installed and swallow the signal for good.
        if self._handle_signal and self._signal is not None:
            self._signal.install()

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install_signal()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._signal is not None:
            self._signal.uninstall()
        if self._reader_started and self.source is not None:
            self.source.close()
            self._reader_started = False

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A run that saves .sft checkpoints must fail now, not at its first save, when its state
        # holds something a .sft cannot store (every rank checks the same state and raises alike).
        if self._extension(trainer) == ".sft":
            from lightning_utils.plugins import check_checkpoint_storable

            check_checkpoint_storable(trainer, type(self).__name__)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install_signal()
        step = trainer.global_step
        # No save/eval/export right after a resume, and none at step 0: nothing changed yet.
        self.last_save_step = self.last_eval_step = self.last_export_step = step
        self._boundary_step = step
        self.quit_requested = False
        self._exporter = None  # found again: the trainer's callbacks may differ from the last fit
        self._clock.start(time.monotonic())
        self._ckpt_dir = broadcast_object(self._default_dir(trainer), src=0, trainer=trainer)
        self._drop_passed_events(step)
        # Configured commands are the same on every rank, so they need no broadcast.
        self._run_pre_loop(trainer, pl_module, [*self.commands, *self._receive(trainer)])

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        previous = self._boundary_step
        if step == previous:  # a gradient-accumulation micro-batch: no optimizer step yet
            return
        self._boundary_step = step
        self._clock.tick(step - previous, time.monotonic())
        lines = self._receive(trainer) if step % self.check_every_n_steps == 0 else []
        self._run_boundary(trainer, pl_module, previous, step, lines)
        if 0 < trainer.max_steps <= step:
            # max_steps ends the run after this batch: the final save happens here, at the step
            # boundary, like ModelCheckpoint(every_n_train_steps)'s. Written at on_train_end, after
            # Lightning counted the epoch as finished, the file would tell Lightning to resume at the
            # next epoch (only ResumableDataLoader gives it the rest of the epoch back).
            self._run_train_end(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._run_train_end(trainer, pl_module)

    def _run_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.quit_requested or trainer.global_step == self.last_save_step:
            return
        self._run_step_end(trainer, pl_module, train_end_actions(self.flags), "end of training", "at the end")

    def state_dict(self) -> dict[str, Any]:
        # Plain ints and strings only, so the state survives a .sft checkpoint (no pickle).
        return {
            "events": [[str(cmd), int(when)] for cmd, when in self.events],
            "last_save_step": self.last_save_step,
            "last_eval_step": self.last_eval_step,
            "last_export_step": self.last_export_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = []
        for text, when in state_dict.get("events", []):
            try:
                self.events.append((parse_command(str(text)), int(when)))
            except (CommandError, ValueError) as err:
                log.warning("dropped a saved schedule that no longer parses: %s", err)
        for key in ("last_save_step", "last_eval_step", "last_export_step"):
            value = state_dict.get(key)
            setattr(self, key, int(value) if value is not None else None)

    # ------------------------------------------------------------------------------------------
    # reading, and running what the commands declare
    # ------------------------------------------------------------------------------------------
    def _receive(self, trainer: Trainer) -> list[str]:
        """Rank 0's new lines (and signal), identical on every rank. A collective call."""
        lines: list[str] = []
        if self._is_leader:
            if self._signal is not None and self._signal.consume():
                log.info("received %s: running %r at this step", self._signal.name, str(self.signal_command))
                lines.append(str(self.signal_command))
            if self.source is not None:
                lines.extend(self.source.poll())
        elif self._signal is not None:
            self._signal.consume()  # only rank 0's signal counts; don't let a stale flag linger
        return list(broadcast_object(lines, src=0, trainer=trainer))

    def _parse(self, lines: Iterable[str]) -> list[Command]:
        commands = []
        for line in lines:
            try:
                commands.append(parse_command(line))
            except CommandError as err:
                self._warn(f"ignored bad command: {err}")
                continue
            self._info(f"command {line!r}")
        return commands

    def _run_pre_loop(self, trainer: Trainer, pl_module: LightningModule, lines: list[str]) -> None:
        """Commands given before the first step, with the actions they declare for then."""
        step = trainer.global_step
        reading = _Reading(step=step, first_open_step=step + 1)
        for cmd in self._parse(lines):
            actions = actions_before_first_step(cmd)
            if not actions:
                self._info(f"'{cmd}' before the first step is ignored: nothing was trained yet")
            self._take(trainer, cmd, actions, reading)
        self._run_step_end(trainer, pl_module, reading.wanted, "command or schedule", "before the first step")

    def _run_boundary(
        self, trainer: Trainer, pl_module: LightningModule, previous: int, step: int, lines: list[str]
    ) -> None:
        """A step boundary: the cadences, the commands read, the schedules due, then the step-end actions."""
        periodic = self.cadence.due(previous, step)
        if not (lines or periodic or any(previous < when <= step for _, when in self.events)):
            return  # most boundaries: nothing read, nothing due
        reading = _Reading(step=step, first_open_step=step, wanted=periodic)
        for cmd in self._parse(lines):  # first: an 'event clear' typed now drops what is due now too
            self._take(trainer, cmd, actions_at_step(cmd, self.flags), reading)
        for cmd in self._pop_due_events(previous, step):
            self._info(f"scheduled '{cmd}' due at step {step}")
            self._take(trainer, cmd, actions_at_step(cmd, self.flags), reading)
        while reading.due:  # schedules typed for this very step
            cmd = reading.due.pop(0)
            self._take(trainer, cmd, actions_at_step(cmd, self.flags), reading)
        self._run_step_end(trainer, pl_module, reading.wanted, "command or schedule", f"at step {step}")

    def _take(self, trainer: Trainer, cmd: Command, actions: Iterable[Action], reading: _Reading) -> None:
        """Run the actions of ``cmd`` that act at once, in order; note its step-end ones in ``reading``."""
        for action in actions:
            if action in STEP_END:
                reading.wanted.add(action)
            else:
                self._act_at_once(trainer, action, cmd, reading)

    def _act_at_once(self, trainer: Trainer, action: Action, cmd: Any, reading: _Reading) -> None:
        # ``cmd`` is the command that declared ``action``; it carries the argument (lr value, target, schedule).
        if action is Action.SCHEDULE:
            self._schedule(cmd, reading)
        elif action is Action.SHOW_EVENTS:
            listing = "\n".join(f"  {c}@{w}" for c, w in sorted(self.events, key=lambda e: e[1])) or "  (none)"
            self._info("scheduled commands:\n" + listing)
        elif action is Action.CLEAR_EVENTS:
            self._info(f"cleared {len(self.events)} scheduled command(s)")
            self.events.clear()
        elif action is Action.HELP:
            self._info(HELP_TEXT)
        elif action is Action.TIME_LEFT:
            self._time_left(trainer, cmd.target, reading.step)
        elif action is Action.SET_LR:
            self._set_lr(trainer, cmd.value)
        elif action is Action.SET_LOSS_SCALE:
            self._set_loss_scale(trainer, cmd.value)
        else:  # pragma: no cover - every action is handled above or is a step-end one
            raise AssertionError(f"no handler for {action}")

    def _schedule(self, cmd: Schedule, reading: _Reading) -> None:
        if cmd.step < reading.first_open_step:
            self._warn(f"ignored '{cmd}': step {cmd.step} has already passed (now at step {reading.step})")
        elif cmd.step == reading.step:
            reading.due.append(cmd.command)
        elif (cmd.command, cmd.step) in self.events:  # e.g. configured again after a resume
            self._info(f"'{cmd}' is already scheduled")
        else:
            self.events.append((cmd.command, cmd.step))
            self._info(f"scheduled '{cmd.command}' for step {cmd.step}")

    def _run_step_end(
        self, trainer: Trainer, pl_module: LightningModule, wanted: Iterable[Action], cause: str, when: str
    ) -> None:
        """Run ``wanted`` and what the flags add, once each: checkpoint first (the safest thing to
        have), then export, eval, and stop. ``cause`` names a save's reason unless it is a quit's,
        ``when`` the moment of a quit."""
        plan = step_end_plan(wanted, self.flags)
        for action in plan:
            if action is Action.SAVE:
                self._save(trainer, "quit" if Action.QUIT in plan else cause)
            elif action is Action.EXPORT:
                self._export(trainer, pl_module)
            elif action is Action.EVAL:
                self._eval(trainer, pl_module)
            elif action is Action.QUIT:
                self._quit(trainer, when)

    def _pop_due_events(self, previous: int, step: int) -> list[Command]:
        due = [cmd for cmd, when in self.events if previous < when <= step]
        self.events = [(cmd, when) for cmd, when in self.events if when > step]
        return due

    def _drop_passed_events(self, step: int) -> None:
        kept = [(c, w) for c, w in self.events if w > step]
        for cmd, when in self.events:
            if when <= step:
                self._warn(f"dropped scheduled '{cmd}@{when}': the run is already at step {step}")
        self.events = kept

    # ------------------------------------------------------------------------------------------
    # actions on the trainer
    # ------------------------------------------------------------------------------------------
    def _default_dir(self, trainer: Trainer) -> str:
        if self.dirpath is not None:
            return str(self.dirpath)
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)  # a ModelCheckpoint's folder
        if dirpath:
            return str(dirpath)
        return storage.join(trainer.default_root_dir, "checkpoints")

    def _extension(self, trainer: Trainer) -> str:
        if self.file_extension is not None:
            return self.file_extension
        chosen = getattr(trainer.checkpoint_callback, "FILE_EXTENSION", None)
        if chosen and chosen != ".ckpt":  # e.g. SafetensorsModelCheckpoint's ".sft"
            return str(chosen)
        from lightning_utils.plugins import SafetensorsCheckpointIO

        io = getattr(trainer.strategy, "checkpoint_io", None)
        while io is not None and not isinstance(io, SafetensorsCheckpointIO):
            io = getattr(io, "checkpoint_io", None)  # unwrap AsyncCheckpointIO and friends
        return ".sft" if io is not None else ".ckpt"

    def checkpoint_path(self, trainer: Trainer) -> Path | str:
        """Where a save at the trainer's current step goes (a URL string in a URL folder)."""
        folder = self._ckpt_dir or self._default_dir(trainer)
        name = self.filename.format(step=trainer.global_step, epoch=trainer.current_epoch)
        return storage.path_or_url(storage.join(folder, name + self._extension(trainer)))

    def _agreed(
        self, trainer: Trainer, what: str, fn: Callable[[], Any], soft: tuple[type[Exception], ...] = ()
    ) -> Any:
        """Run ``fn`` on this rank, then settle its outcome with every rank (a collective).

        Every rank calls this at the same point with the same ``what``. If ``fn`` raised on any
        rank, every rank learns which rank failed first and how: an error of a ``soft`` type on
        every failing rank is reported and training goes on (returns ``None``); any other error
        ends every rank with a :class:`ControlError` naming the rank and the error (chained to the
        original on the rank that raised it), so that no rank is left waiting in a collective the
        failed rank never joins. Returns ``fn``'s result when it succeeded everywhere.
        """
        error: Exception | None = None
        result = None
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - settled with every rank below, then raised or reported
            error = err
        if not trainer.strategy.reduce_boolean_decision(error is not None, all=False):
            return result
        mine = None if error is None else (f"{type(error).__name__}: {error}", isinstance(error, soft))
        reports = all_gather_object(mine)
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        rank, (text, _) = failed[0]
        step = trainer.global_step
        message = f"{what} failed at step {step} on rank {rank}: {text}"
        if all(is_soft for _, (_, is_soft) in failed):
            if error is not None:  # each failing rank shows its own error, with its traceback
                own = f"{what} failed at step {step} on rank {trainer.global_rank}: {mine[0] if mine else ''}"
                log.warning("%s; training goes on", own, exc_info=error)
            else:
                self._warn(message + "; training goes on")
            return None
        raise ControlError(f"TrainingControl: {message}") from error

    def _save(self, trainer: Trainer, reason: str) -> None:
        step = trainer.global_step
        path = self.checkpoint_path(trainer)
        self.last_save_step = step  # before the save, so the checkpoint records it
        lasts = self._last_files(trainer, path)
        for callback, last in lasts:
            callback.last_model_path = str(last)  # part of the state being saved, as ModelCheckpoint does
        self._write_checkpoint(trainer, path)
        self.last_checkpoint_path = path
        self._info(f"saved checkpoint {path} ({reason}, step {step})")
        for callback, last in lasts:
            self._point_last(trainer, callback, last, path)

    def _write_checkpoint(self, trainer: Trainer, path: Path | str) -> None:
        """``trainer.save_checkpoint(path)``, with the outcome settled on every rank before any goes on.

        The dict is built on every rank (gathering sharded state is collective), written by the
        strategy (rank 0, or every rank for sharded files), then every rank reports whether its
        part failed: a write failing on rank 0 raises on every rank instead of leaving the others
        waiting in ``Trainer.save_checkpoint``'s closing barrier.
        """
        checkpoint = _internals.dump_checkpoint(trainer)
        self._agreed(trainer, f"saving {path}", lambda: trainer.strategy.save_checkpoint(checkpoint, path))

    def _last_files(self, trainer: Trainer, path: Path | str) -> list[tuple[ModelCheckpoint, Path | str]]:
        """The ``last`` file of every ModelCheckpoint with ``save_last`` that a checkpoint at ``path``
        must update (same file extension), so that ``fit(ckpt_path="last")`` restores it."""
        found = []
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or not callback.save_last or not callback.dirpath:
                continue
            if callback.FILE_EXTENSION.lower() != os.path.splitext(os.fspath(path))[1].lower():
                continue  # a '.ckpt' name must never stand for a '.sft' file (the suffix picks the reader)
            metrics = dict(trainer.callback_metrics)
            metrics.update(epoch=torch.tensor(trainer.current_epoch), step=torch.tensor(trainer.global_step))
            last = callback.format_checkpoint_name(metrics, callback.CHECKPOINT_NAME_LAST)
            found.append((callback, storage.path_or_url(last)))
        return found

    def _point_last(self, trainer: Trainer, callback: ModelCheckpoint, last: Path | str, path: Path | str) -> None:
        """Make ``last`` (a ModelCheckpoint's save_last file) the checkpoint just written at ``path``:
        a symlink with ``save_last="link"``, else a copy (a second save for a folder checkpoint)."""
        # Object storage has neither links nor renames: there ``last`` is a second save.
        local = not storage.is_url(path) and not storage.is_url(last)
        link = local and callback.save_last == "link"
        # Rank 0 wrote the file and decides; the decision picks collectives, so every rank takes it.
        copy = local and not link and broadcast_object(self._is_leader and os.path.isfile(path), src=0, trainer=trainer)
        if link or copy:

            def update() -> None:
                if self._is_leader:
                    (link_last if link else copy_last)(path, last)

            self._agreed(trainer, f"pointing {last} at {path}", update)
        else:
            self._write_checkpoint(trainer, last)
        _internals.note_checkpoint_saved(callback, str(path))

    def _find_exporter(self, trainer: Trainer) -> Any:
        if self.exporter is not None:
            return self.exporter
        if self._exporter is None:
            from lightning_utils.callbacks.export_weights import ExportWeights

            # trainer.callbacks is set by Lightning's callback connector, not declared on Trainer
            found = [cb for cb in getattr(trainer, "callbacks", ()) if isinstance(cb, ExportWeights)]
            self._exporter = found[0] if found else ExportWeights()
        return self._exporter

    def _export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step == self.last_export_step:
            self._info(f"weights of step {step} already exported; not exporting again")
            return
        self.last_export_step = step
        exporter = self._find_exporter(trainer)
        # Every rank exports (gathering sharded weights is collective); a bad argument or a full disk
        # is reported and training goes on, anything else ends every rank.
        where = self._agreed(trainer, "export", lambda: exporter.export(trainer, pl_module), soft=(ValueError, OSError))
        if where is not None:
            self._info(f"exported the weights of step {step} to {where}")

    def _eval(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.last_eval_step = trainer.global_step
        if self.eval_fn is not None:
            eval_fn = self.eval_fn
            # A failing evaluation is reported, and training goes on.
            self._agreed(trainer, "eval_fn", lambda: eval_fn(trainer, pl_module), soft=(Exception,))
            return
        if not is_overridden("validation_step", pl_module):
            self._warn("eval: no eval_fn was given and the model has no validation_step; nothing to run")
            return
        ran = self._agreed(trainer, "eval (the validation loop)", lambda: _internals.run_fit_validation(trainer))
        if not ran:  # pragma: no cover - a Lightning that moved its loops
            self._warn("eval: this Lightning version hides its validation loop; pass eval_fn=")

    def _quit(self, trainer: Trainer, when: str) -> None:
        self.quit_requested = True
        trainer.should_stop = True
        self._info(f"quit {when}: training stops")
        min_steps = trainer.min_steps
        if min_steps and trainer.global_step < min_steps:
            self._warn(f"quit: Lightning keeps training until min_steps={min_steps}")

    def _set_lr(self, trainer: Trainer, value: float) -> None:
        if not trainer.optimizers:
            self._warn("lr: the trainer has no optimizer")
            return
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        self._info(set_lr(trainer.optimizers, schedulers, value))

    def _set_loss_scale(self, trainer: Trainer, value: float) -> None:
        if not set_loss_scale(getattr(trainer.precision_plugin, "scaler", None), value):
            self._warn(f"loss_scale: no AMP grad scaler in use (precision={trainer.precision!r}); ignored")
            return
        self._info(f"loss scale set to {value:g}")

    def _time_left(self, trainer: Trainer, target: int | None, step: int) -> None:
        if target is None:
            target = last_step(trainer.max_steps, lambda: trainer.estimated_stepping_batches)
        self._info(time_left(step, target, self._clock.seconds_per_step()))

    def _info(self, message: str) -> None:
        if self._is_leader:
            log.info(message)

    def _warn(self, message: str) -> None:
        if self._is_leader:
            log.warning(message)
