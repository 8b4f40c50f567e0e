"""``TrainingControl``: steer a running ``fit`` (save, eval, export, lr, quit, schedules) and run
periodic save/eval/export, all at step boundaries and identically on every rank.

Commands come from standard input (the default), a command file or FIFO, or a signal
(:mod:`lightning_utils.control.sources`), and follow the grammar of
:mod:`lightning_utils.control.commands`. Global rank 0 reads; at each optimizer-step boundary
(``on_train_batch_end`` after ``global_step`` moved) the lines it received are broadcast
through :func:`lightning_utils.distributed.broadcast_object` (the strategy's broadcast), so every rank runs the same commands at the same step
and collective work (``trainer.save_checkpoint``, gathering weights for an export) lines up.

This callback must never act from a reader thread or a signal handler, never block the
training thread on input, and never let a bad command stop training: bad commands are
reported on the log and ignored.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_utils.control.commands import (
    HELP_TEXT,
    ClearEvents,
    Command,
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
from lightning_utils.control.sources import CommandSource, SignalFlag, resolve_source
from lightning_utils.distributed import broadcast_object

__all__ = ["TrainingControl"]

log = logging.getLogger(__name__)

EvalFn = Callable[[Trainer, LightningModule], Any]


def _make_log_visible() -> None:
    # Command answers ("lr set to ...") are for the person at the terminal, so INFO must show
    # even when the application configured no logging; Lightning does the same for its logger.
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if not log.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[training control] %(message)s"))
        log.addHandler(handler)


def _every(value: int | None, name: str) -> int | None:
    if value is None or value == 0:  # the original treats 0 like None
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a positive integer, 0 or None, got {value!r}")
    return value


def _crossed(every: int | None, previous: int, step: int) -> bool:
    """Whether a multiple of ``every`` lies in ``(previous, step]`` (robust to steps of 2+)."""
    return every is not None and step // every > previous // every


def _all_schedulers(schedulers: Iterable[Any]) -> list[Any]:
    """The schedulers and those they hold (SequentialLR, ChainedScheduler keep ``_schedulers``)."""
    out: list[Any] = []
    for scheduler in schedulers:
        out.append(scheduler)
        inner = getattr(scheduler, "_schedulers", None)
        if isinstance(inner, (list, tuple)):
            out.extend(_all_schedulers(inner))
    return out


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    parts += [f"{minutes}m", f"{sec}s"]
    return " ".join(parts)


class TrainingControl(Callback):
    r"""Run-time commands and periodic save/eval/export for ``Trainer.fit``.

    Type into the terminal while training runs (or write into ``source``)::

        save | export | eval | quit | eval_quit | lr 1e-4 | loss_scale 1024 | time | time to 5000
        export@5000 | event | event clear | help

    Args:
        source: ``"stdin"`` (default), a command file or FIFO path (``echo save >> PATH``),
            a :class:`~lightning_utils.control.sources.CommandSource`, or ``None`` (no reader:
            schedules, the signal and periodic work only). Only global rank 0 reads.
        save_every_n_steps: periodic checkpoint every N optimizer steps. ``None``/0 falls back
            to ``eval_every_n_steps`` (as in the original); both ``None``: no periodic save.
        eval_every_n_steps: periodic evaluation every N steps.
        export_every_n_steps: periodic weights export every N steps (no checkpoint).
        save_on_quit: ``quit`` writes a checkpoint first.
        export_on_quit: ``quit`` exports the weights (independently of ``save_on_quit``).
        export_on_save: export the weights with every checkpoint this callback writes.
        save_on_export: the ``export`` command also writes a checkpoint (the original's behaviour).
        save_on_train_end: write a final checkpoint when training ends, unless one was written
            at that step or the run was ended by ``quit`` (then ``save_on_quit`` decides).
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
    """

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
        self._source_arg = source
        self.source: CommandSource | None = resolve_source(source)
        self.eval_every_n_steps = _every(eval_every_n_steps, "eval_every_n_steps")
        self.save_every_n_steps = _every(save_every_n_steps, "save_every_n_steps") or self.eval_every_n_steps
        self.export_every_n_steps = _every(export_every_n_steps, "export_every_n_steps")
        self.save_on_quit = bool(save_on_quit)
        self.export_on_quit = bool(export_on_quit)
        self.export_on_save = bool(export_on_save)
        self.save_on_export = bool(save_on_export)
        self.save_on_train_end = bool(save_on_train_end)
        self.dirpath = Path(dirpath) if dirpath is not None else None
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
        self.last_checkpoint_path: Path | None = None
        self.quit_requested = False
        self._boundary_step = 0
        self._is_leader = True
        self._ckpt_dir: Path | None = None
        self._step_times: deque[float] = deque(maxlen=100)
        self._last_boundary_time: float | None = None
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
        env = getattr(trainer.strategy, "cluster_environment", None)
        if env is None:  # single-device strategies keep it on the accelerator connector (as Lightning reads it)
            env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
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
        # _SignalConnector has recorded the process's handlers (after setup/on_fit_start): on a
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

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install_signal()
        step = trainer.global_step
        # No save/eval/export right after a resume, and none at step 0: nothing changed yet.
        self.last_save_step = self.last_eval_step = self.last_export_step = step
        self._boundary_step = step
        self.quit_requested = False
        self._exporter = None  # found again: the trainer's callbacks may differ from the last fit
        self._last_boundary_time = time.monotonic()
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
        now = time.monotonic()
        if self._last_boundary_time is not None:
            self._step_times.append((now - self._last_boundary_time) / (step - previous))
        self._last_boundary_time = now
        lines = self._receive(trainer) if step % self.check_every_n_steps == 0 else []
        self._run_boundary(trainer, pl_module, previous, step, lines)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.quit_requested or not self.save_on_train_end:
            return
        if trainer.global_step != self.last_save_step:
            if self._save(trainer, pl_module, "end of training") and self.export_on_save:
                self._export(trainer, pl_module)

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
    # reading and dispatch
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
        """Commands typed before the first step: ``eval``/``eval_quit``/``quit`` act, saves wait."""
        step = trainer.global_step
        do_eval = do_quit = False
        for cmd in self._parse(lines):
            if isinstance(cmd, (Eval, Quit, EvalQuit)):
                do_eval = do_eval or isinstance(cmd, (Eval, EvalQuit))
                do_quit = do_quit or isinstance(cmd, (Quit, EvalQuit))
            elif isinstance(cmd, (Save, Export)):
                self._info(f"'{cmd}' before the first step is ignored: nothing was trained yet")
            else:  # lr, schedules, event, time, help
                self._apply_now(trainer, cmd, step, step, due=[])
        if do_eval:
            self._eval(trainer, pl_module)
        if do_quit:
            self._quit(trainer, "before the first step")

    def _run_boundary(
        self, trainer: Trainer, pl_module: LightningModule, previous: int, step: int, lines: list[str]
    ) -> None:
        wants: set[str] = set()
        due: list[Command] = []
        for cmd in self._parse(lines):
            self._apply_now(trainer, cmd, previous, step, due, wants)
        for cmd in self._pop_due_events(previous, step):
            self._info(f"scheduled '{cmd}' due at step {step}")
            self._apply_now(trainer, cmd, previous, step, due, wants)
        while due:  # schedules typed for this very step
            self._apply_now(trainer, due.pop(0), previous, step, [], wants)

        quit_now = "quit" in wants
        save = (
            "save" in wants
            or ("export" in wants and self.save_on_export)
            or (quit_now and self.save_on_quit)
            or _crossed(self.save_every_n_steps, previous, step)
        )
        export = (
            "export" in wants
            or (quit_now and self.export_on_quit)
            or _crossed(self.export_every_n_steps, previous, step)
        )
        evaluate = "eval" in wants or _crossed(self.eval_every_n_steps, previous, step)

        # Within a step: checkpoint first (the safest thing), then export, eval, and stop.
        saved = False
        if save:
            saved = self._save(trainer, pl_module, "quit" if quit_now else "command or schedule")
        if export or (saved and self.export_on_save):
            self._export(trainer, pl_module)
        if evaluate and step != self.last_eval_step:
            self._eval(trainer, pl_module)
        if quit_now:
            self._quit(trainer, f"at step {step}")

    def _apply_now(
        self,
        trainer: Trainer,
        cmd: Command,
        previous: int,
        step: int,
        due: list[Command],
        wants: set[str] | None = None,
    ) -> None:
        """Run what acts immediately; record what acts at the end of the boundary in ``wants``."""
        if isinstance(cmd, Schedule):
            if cmd.step < step or (wants is None and cmd.step <= step):
                self._warn(f"ignored '{cmd}': step {cmd.step} has already passed (now at step {step})")
            elif cmd.step == step:
                due.append(cmd.command)
            elif (cmd.command, cmd.step) in self.events:  # e.g. configured again after a resume
                self._info(f"'{cmd}' is already scheduled")
            else:
                self.events.append((cmd.command, cmd.step))
                self._info(f"scheduled '{cmd.command}' for step {cmd.step}")
        elif isinstance(cmd, ShowEvents):
            listing = "\n".join(f"  {c}@{w}" for c, w in sorted(self.events, key=lambda e: e[1])) or "  (none)"
            self._info("scheduled commands:\n" + listing)
        elif isinstance(cmd, ClearEvents):
            self._info(f"cleared {len(self.events)} scheduled command(s)")
            self.events.clear()
        elif isinstance(cmd, Help):
            self._info(HELP_TEXT)
        elif isinstance(cmd, TimeLeft):
            self._time_left(trainer, cmd.target, step)
        elif isinstance(cmd, SetLR):
            self._set_lr(trainer, cmd.value)
        elif isinstance(cmd, SetLossScale):
            self._set_loss_scale(trainer, cmd.value)
        elif wants is not None:
            if isinstance(cmd, Save):
                wants.add("save")
            elif isinstance(cmd, Export):
                wants.add("export")
            elif isinstance(cmd, Eval):
                wants.add("eval")
            elif isinstance(cmd, Quit):
                wants.add("quit")
            elif isinstance(cmd, EvalQuit):
                wants.update(("eval", "quit"))

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
    # actions
    # ------------------------------------------------------------------------------------------
    def _default_dir(self, trainer: Trainer) -> str:
        if self.dirpath is not None:
            return str(self.dirpath)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return str(ckpt.dirpath)
        return str(Path(trainer.default_root_dir) / "checkpoints")

    def _extension(self, trainer: Trainer) -> str:
        if self.file_extension is not None:
            return self.file_extension
        ckpt = trainer.checkpoint_callback
        chosen = getattr(ckpt, "FILE_EXTENSION", None) if ckpt is not None else None
        if chosen and chosen != ".ckpt":  # e.g. SafetensorsModelCheckpoint's ".sft"
            return str(chosen)
        from lightning_utils.plugins import SafetensorsCheckpointIO

        io = getattr(trainer.strategy, "checkpoint_io", None)
        while io is not None and not isinstance(io, SafetensorsCheckpointIO):
            io = getattr(io, "checkpoint_io", None)  # unwrap AsyncCheckpointIO and friends
        return ".sft" if io is not None else ".ckpt"

    def checkpoint_path(self, trainer: Trainer) -> Path:
        """Where a save at the trainer's current step goes."""
        folder = self._ckpt_dir or self._default_dir(trainer)
        name = self.filename.format(step=trainer.global_step, epoch=trainer.current_epoch)
        return Path(folder) / (name + self._extension(trainer))

    def _save(self, trainer: Trainer, pl_module: LightningModule, reason: str) -> bool:
        step = trainer.global_step
        if step == self.last_save_step:
            self._info(f"checkpoint of step {step} already written; not saving again")
            return False
        path = self.checkpoint_path(trainer)
        self.last_save_step = step  # before the save, so the checkpoint records it
        # Collective: every rank calls it (it ends in a barrier); rank 0 writes.
        trainer.save_checkpoint(path, weights_only=False)
        self.last_checkpoint_path = path
        self._info(f"saved checkpoint {path} ({reason}, step {step})")
        return True

    def _find_exporter(self, trainer: Trainer) -> Any:
        if self.exporter is not None:
            return self.exporter
        if self._exporter is None:
            from lightning_utils.callbacks.export_weights import ExportWeights

            found = [cb for cb in trainer.callbacks if isinstance(cb, ExportWeights)]
            self._exporter = found[0] if found else ExportWeights()
        return self._exporter

    def _export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step == self.last_export_step:
            self._info(f"weights of step {step} already exported; not exporting again")
            return
        self.last_export_step = step
        try:
            self._find_exporter(trainer).export(trainer, pl_module)
        except (ValueError, OSError) as err:
            self._warn(f"export failed at step {step}: {err}")

    def _eval(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.last_eval_step = trainer.global_step
        if self.eval_fn is not None:
            try:
                self.eval_fn(trainer, pl_module)
            except Exception:  # a failing evaluation is reported, and training goes on
                log.exception("eval_fn failed at step %d", trainer.global_step)
            return
        if not is_overridden("validation_step", pl_module):
            self._warn("eval: no eval_fn was given and the model has no validation_step; nothing to run")
            return
        self._run_validation_loop(trainer)

    def _run_validation_loop(self, trainer: Trainer) -> None:
        # Lightning has no public "validate now" during fit (only val_check_interval); this runs
        # the fit loop's own validation loop exactly as the epoch loop does at a val check.
        try:
            val_loop = trainer.fit_loop.epoch_loop.val_loop
            connector = trainer._logger_connector
            first_loop_iter = connector._first_loop_iter
        except AttributeError:  # pragma: no cover - a Lightning that moved these internals
            self._warn("eval: this Lightning version hides its validation loop; pass eval_fn=")
            return
        trainer.validating = True
        try:
            val_loop.run()
        finally:
            trainer.training = True
            connector._first_loop_iter = first_loop_iter

    def _quit(self, trainer: Trainer, when: str) -> None:
        self.quit_requested = True
        trainer.should_stop = True
        self._info(f"quit {when}: training stops")
        min_steps = getattr(trainer.fit_loop, "min_steps", None)
        if min_steps and trainer.global_step < min_steps:
            self._warn(f"quit: Lightning keeps training until min_steps={min_steps}")

    def _set_lr(self, trainer: Trainer, value: float) -> None:
        if not trainer.optimizers:
            self._warn("lr: the trainer has no optimizer")
            return
        # Per param group: new lr / old lr. Closed-form schedulers (LambdaLR, WarmupLR, OneCycleLR)
        # recompute lr = base * factor(step) at every scheduler step, so their bases are scaled by
        # this ratio: the schedule then goes on from the new value (lr 0.2 now, 0.2 * f(t+1)/f(t)
        # next) instead of snapping back to base * f(t+1). Chainable ones just continue from it.
        ratios: dict[int, float | None] = {}
        groups = 0
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                old = float(group.get("lr", 0.0))
                ratio = value / old if old > 0 else None
                ratios[id(group)] = ratio
                if isinstance(group.get("lr"), torch.Tensor):
                    group["lr"].fill_(value)  # a tensor lr (capturable/compiled optimizers)
                else:
                    group["lr"] = value
                for key in ("initial_lr", "max_lr", "min_lr"):  # the bases some schedulers keep in the group
                    base = group.get(key)
                    if not isinstance(base, (int, float)) or isinstance(base, bool):
                        continue
                    if ratio is not None:
                        group[key] = base * ratio
                    elif key == "initial_lr":
                        group[key] = value
                groups += 1
        notes: list[str] = []
        for scheduler in _all_schedulers(config.scheduler for config in trainer.lr_scheduler_configs):
            param_groups = getattr(getattr(scheduler, "optimizer", None), "param_groups", None)
            for attr in ("base_lrs", "max_lrs"):  # max_lrs: CyclicLR
                bases = getattr(scheduler, attr, None)
                if not isinstance(bases, list) or param_groups is None or len(bases) != len(param_groups):
                    continue
                rebased = []
                for base, group in zip(bases, param_groups):
                    ratio = ratios.get(id(group))
                    # lr was 0 (e.g. the first warmup step): no ratio, so the new value becomes the base
                    rebased.append(base * ratio if ratio is not None else (value if attr == "base_lrs" else base))
                setattr(scheduler, attr, rebased)
                if attr == "base_lrs":
                    notes.append(f"{type(scheduler).__name__} base lr now {', '.join(f'{b:g}' for b in rebased)}")
        # The bases say where the schedule goes from here (during a warmup, far above the value typed).
        rebased_note = f"; the schedule continues from it ({'; '.join(notes)})" if notes else ""
        self._info(
            f"lr set to {value:g} on {groups} param group(s) of {len(trainer.optimizers)} optimizer(s){rebased_note}"
        )

    def _set_loss_scale(self, trainer: Trainer, value: float) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
            self._warn(f"loss_scale: no AMP grad scaler in use (precision={trainer.precision!r}); ignored")
            return
        if getattr(scaler, "_scale", None) is None:
            scaler._init_scale = float(value)  # not created yet: it starts from the init scale
        else:
            scaler.update(new_scale=float(value))
        self._info(f"loss scale set to {value:g}")

    def _time_left(self, trainer: Trainer, target: int | None, step: int) -> None:
        if target is None:
            target = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            if target is None:
                estimate = trainer.estimated_stepping_batches
                target = int(estimate) if estimate != float("inf") else None
        if target is None:
            self._info("time: the run has no known last step; use 'time to N'")
            return
        if not self._step_times:
            self._info(f"time: at step {step}; no step timed yet")
            return
        per_step = sum(self._step_times) / len(self._step_times)
        left = max(0, target - step)
        self._info(f"time: step {step}/{target}, {per_step:.3g} s/step, about {_duration(left * per_step)} left")

    def _info(self, message: str) -> None:
        if self._is_leader:
            log.info(message)

    def _warn(self, message: str) -> None:
        if self._is_leader:
            log.warning(message)
