"""TrainingControl: the command and cadence rules on a fake trainer, then in-process fits."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest
import torch
from control_scripts.fakes import FakeTrainer, RecordingExporter, StepScript, drive
from control_scripts.recording_module import RecordingModule, RecordingModuleWithVal
from helpers.lightning import cpu_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_utils.callbacks.training_control import TrainingControl

LOGGER = "lightning_utils.callbacks.training_control"


def make(tmp_path, script=None, **kwargs):
    trainer = FakeTrainer(tmp_path)
    kwargs.setdefault("signal", None)
    eval_fn = kwargs.pop("eval_fn", lambda t, m: t.trace.append(("eval", t.global_step)))
    control = TrainingControl(
        source=StepScript(lambda: trainer.global_step, script or {}),
        eval_fn=eval_fn,
        exporter=RecordingExporter(trainer.trace),
        **kwargs,
    )
    return control, trainer


# ---------------------------------------------------------------------------------------------
# the rules, on a fake trainer (mostly a 12-step run saving every 5 steps, evaluating every 4)
# ---------------------------------------------------------------------------------------------
def test_no_input_periodic_save_and_eval_then_final_save(tmp_path):
    control, trainer = make(tmp_path, save_every_n_steps=5, eval_every_n_steps=4)
    trace = drive(control, trainer, 12)
    # the last step is evaluated, then saved by the final save at the end of training
    assert trace == [("eval", 4), ("save", 5), ("eval", 8), ("save", 10), ("eval", 12), ("save", 12)]
    assert [p.name for p in trainer.saved_paths] == ["step=5.ckpt", "step=10.ckpt", "step=12.ckpt"]
    assert all(p.parent == tmp_path / "checkpoints" for p in trainer.saved_paths)


def test_save_then_quit(tmp_path):
    control, trainer = make(tmp_path, {2: ["save"], 3: ["quit"]}, save_every_n_steps=5, eval_every_n_steps=4)
    trace = drive(control, trainer, 12)
    assert trace == [("save", 2), ("save", 3), ("quit", 3)]
    assert trainer.should_stop and control.quit_requested


def test_quit_without_save_still_exports(tmp_path):
    control, trainer = make(tmp_path, {3: ["quit"]}, save_on_quit=False, export_on_quit=True)
    trace = drive(control, trainer, 12)
    # export_on_quit exports even when quit does not save
    assert trace == [("export", 3), ("quit", 3)]


def test_schedules_run_at_their_step_and_past_ones_are_reported(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    control, trainer = make(
        tmp_path, {1: ["export@3"], 3: ["save@2", "save"]}, save_every_n_steps=5, eval_every_n_steps=4
    )
    trace = drive(control, trainer, 6)
    # export@3 -> one checkpoint and one export at step 3 (the typed 'save' adds no second save);
    # save@2 typed at step 3 is in the past: reported and never fires.
    assert trace == [("save", 3), ("export", 3), ("eval", 4), ("save", 5), ("save", 6)]
    assert "step 2 has already passed" in caplog.text
    assert control.events == []


def test_event_clear_typed_at_a_due_step_drops_what_is_due(tmp_path):
    # typed commands act before the schedules due at the same boundary are taken
    control, trainer = make(tmp_path, {1: ["save@3", "lr 0.5@3"], 3: ["event clear"]}, save_on_train_end=False)
    assert drive(control, trainer, 4) == []
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1


def test_event_show_and_clear(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    control, trainer = make(
        tmp_path, {1: ["save@9", "eval @ 7", "lr 0.01@8", "event show"], 2: ["event clear", "event"]}
    )
    drive(control, trainer, 12)
    assert "eval@7\n  lr 0.01@8\n  save@9" in caplog.text
    assert "cleared 3 scheduled command(s)" in caplog.text
    assert ("save", 9) not in trainer.trace and ("eval", 7) not in trainer.trace
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1


def test_scheduled_command_fires_at_its_step(tmp_path):
    control, trainer = make(tmp_path, {1: ["lr 0.01@4", "save@3", "eval_quit@6"]}, save_on_train_end=False)
    lrs = []
    orig = control.on_train_batch_end

    def spy(t, m, o, b, i):
        orig(t, m, o, b, i)
        lrs.append((t.global_step, t.optimizers[0].param_groups[0]["lr"]))

    control.on_train_batch_end = spy
    trace = drive(control, trainer, 12)
    assert trace == [("save", 3), ("save", 6), ("eval", 6), ("quit", 6)]  # save, then eval, then stop
    assert lrs[2] == (3, 0.1) and lrs[3] == (4, 0.01)


def test_lr_on_every_group_of_every_optimizer_and_bad_values(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    p = [torch.nn.Parameter(torch.zeros(2)) for _ in range(4)]
    opts = [
        torch.optim.SGD([{"params": [p[0]]}, {"params": [p[1]], "lr": 0.5}], lr=0.1),
        torch.optim.AdamW([{"params": [p[2]]}, {"params": [p[3]], "lr": torch.tensor(0.3)}], lr=0.2),
    ]
    trainer = FakeTrainer(tmp_path, optimizers=opts)
    control = TrainingControl(
        source=StepScript(
            lambda: trainer.global_step, {2: ["lr 1e-3"], 3: ["lr abc", "lr", "lr -1", "lr nan", "save@4_", "a@b@c"]}
        ),
        signal=None,
    )
    trace = drive(control, trainer, 5)
    lrs = [float(g["lr"]) for o in opts for g in o.param_groups]
    assert lrs == pytest.approx([0.001] * 4)  # the tensor lr is float32
    assert trainer.global_step == 5 and not trainer.should_stop  # a bad value is reported, never raised
    for bad in ("'lr abc'", "'lr'", "'lr -1'", "'lr nan'", "'save@4_'", "'a@b@c'"):
        assert f"ignored bad command: {bad}" in caplog.text
    assert trace == [("save", 5)]


def test_lr_rebases_lr_schedulers(tmp_path):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    trainer = FakeTrainer(tmp_path, optimizers=[opt])
    from types import SimpleNamespace

    trainer.lr_scheduler_configs = [SimpleNamespace(scheduler=sched)]
    control = TrainingControl(source=StepScript(lambda: trainer.global_step, {1: ["lr 0.2"]}), signal=None)
    drive(control, trainer, 1)
    assert opt.param_groups[0]["lr"] == 0.2
    opt.step()
    sched.step()
    # the schedule continues from the new value (it used to snap back to 0.2 * 0.5 = 0.1 here)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    assert sched.base_lrs == [pytest.approx(0.4)]


def test_eval_quit_before_the_first_step(tmp_path):
    control, trainer = make(tmp_path, {0: ["eval_quit"]}, save_every_n_steps=5, eval_every_n_steps=4)
    trace = drive(control, trainer, 12)
    assert trace == [("eval", 0), ("quit", 0)]
    assert trainer.global_step == 0


def test_save_before_the_loop_is_ignored(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    control, trainer = make(tmp_path, {0: ["save", "export", "lr 0.05"]}, save_on_train_end=False)
    trace = drive(control, trainer, 3)
    assert trace == []
    assert "'save' before the first step is ignored" in caplog.text
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.05  # harmless commands still apply


def test_quit_before_the_loop_saves_nothing(tmp_path):
    control, trainer = make(tmp_path, {0: ["quit"]})
    assert drive(control, trainer, 12) == [("quit", 0)]


@pytest.mark.parametrize("save_every", [None, 0])
def test_save_frequency_falls_back_to_eval_frequency(tmp_path, save_every):
    control, trainer = make(tmp_path, save_every_n_steps=save_every, eval_every_n_steps=4)
    trace = drive(control, trainer, 10)
    assert trace == [("save", 4), ("eval", 4), ("save", 8), ("eval", 8), ("save", 10)]


def test_export_command_and_export_on_save(tmp_path):
    control, trainer = make(tmp_path, {2: ["export"], 4: ["save"]}, export_on_save=True, save_on_export=False)
    trace = drive(control, trainer, 5)
    assert trace == [("export", 2), ("save", 4), ("export", 4), ("save", 5), ("export", 5)]


def test_periodic_export_without_checkpoint(tmp_path):
    control, trainer = make(tmp_path, export_every_n_steps=3, save_on_train_end=False)
    assert drive(control, trainer, 7) == [("export", 3), ("export", 6)]


def test_time_command_reports_eta(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    control, trainer = make(tmp_path, {0: ["time"], 3: ["time", "time to 100", "time to x", "time to 2"]})
    drive(control, trainer, 4)
    assert "no step timed yet" in caplog.text
    assert "step 3/12" in caplog.text and "step 3/100" in caplog.text
    assert "expected 'time' or 'time to N'" in caplog.text
    assert "time: step 2 is behind: the run is at step 3" in caplog.text and "3/2" not in caplog.text


def test_export_command_says_where_the_weights_went(tmp_path, caplog):
    from lightning_utils.callbacks.export_weights import ExportWeights

    caplog.set_level(logging.INFO, logger=LOGGER)
    exporter = ExportWeights(dirpath=tmp_path / "weights")
    holder = {}
    control = TrainingControl(
        source=StepScript(lambda: holder["t"].global_step, {2: ["export"]}), signal=None, save_on_export=False
    )
    trainer = holder["t"] = cpu_trainer(tmp_path, [control, exporter], max_steps=3)
    trainer.fit(RecordingModule())
    where = tmp_path / "weights" / "weights-step=2.sft"
    assert where.is_file()
    assert f"exported the weights of step 2 to {where}" in caplog.text


def test_a_failing_export_is_reported_and_training_goes_on(tmp_path, caplog):
    class FullDisk:
        def export(self, trainer, pl_module):
            raise OSError(28, "No space left on device")

    control = TrainingControl(
        source=None, signal=None, exporter=FullDisk(), commands=["export@2"], save_on_export=False
    )
    trainer = cpu_trainer(tmp_path, [control], max_steps=4)
    trainer.fit(RecordingModule())
    assert trainer.global_step == 4
    assert "export failed at step 2 on rank 0: OSError: [Errno 28] No space left on device" in caplog.text


def test_a_failing_save_ends_the_run_with_the_error(tmp_path):
    from lightning_utils.callbacks.training_control import ControlError

    class FullDiskIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            raise OSError(28, "No space left on device")

    control = TrainingControl(source=None, signal=None, commands=["save@2"])
    trainer = cpu_trainer(tmp_path, [control], max_steps=4, plugins=[FullDiskIO()])
    with pytest.raises(ControlError, match=r"saving .*step=2.ckpt failed at step 2 on rank 0: OSError") as info:
        trainer.fit(RecordingModule())
    assert isinstance(info.value.__cause__, OSError)  # the original error, chained
    assert trainer.global_step == 2


def test_help_and_loss_scale_without_scaler(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    control, trainer = make(tmp_path, {1: ["help", "loss_scale 1024"]})
    drive(control, trainer, 2)
    assert "CMD@STEP" in caplog.text
    assert "no AMP grad scaler in use" in caplog.text


def test_loss_scale_sets_grad_scaler(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    control, trainer = make(tmp_path, {0: ["loss_scale 256"], 2: ["loss_scale 1024"]})
    from types import SimpleNamespace

    trainer.precision_plugin = SimpleNamespace(scaler=scaler)
    control.setup(trainer, None, "fit")
    control.on_train_start(trainer, None)
    assert scaler._init_scale == 256.0  # not created yet: the first scale starts from it
    scaler.scale(torch.tensor(1.0))
    trainer.global_step = 2
    control.on_train_batch_end(trainer, None, None, None, 1)
    assert scaler.get_scale() == 1024.0


def test_gradient_accumulation_micro_batches_are_not_boundaries(tmp_path):
    control, trainer = make(tmp_path, {1: ["save@2"]}, save_on_train_end=False)
    control.setup(trainer, None, "fit")
    control.on_train_start(trainer, None)
    for step in (0, 1, 1, 2, 2, 3):  # global_step seen at each micro-batch end with GA=2
        trainer.global_step = step
        control.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.trace == [("save", 2)]


def test_check_every_n_steps_still_fires_schedules_on_time(tmp_path):
    control, trainer = make(tmp_path, {2: ["save@3"], 3: ["quit"]}, check_every_n_steps=2)
    source = control.source
    trace = drive(control, trainer, 8)
    # polls at steps 0 (pre-loop), 2, 4: the 'quit' queued for step 3 is read at step 4
    assert trace == [("save", 3), ("save", 4), ("quit", 4)]
    assert source.polls == 3


def test_docstring_shows_the_rules_table_and_grouped_settings_keep_the_argument_names():
    import dataclasses
    import inspect

    from lightning_utils.control.dispatch import ActionFlags, Cadence, actions_table

    assert actions_table() in inspect.cleandoc(TrainingControl.__doc__), "paste dispatch.actions_table() into it"
    parameters = inspect.signature(TrainingControl).parameters
    control = TrainingControl(source=None, signal=None, save_every_n_steps=7, export_on_quit=True)
    for group, cls in (("flags", ActionFlags), ("cadence", Cadence)):
        for f in dataclasses.fields(cls):
            assert parameters[f.name].default == f.default  # the same argument, the same default
            assert getattr(control, f.name) == getattr(getattr(control, group), f.name)
    assert control.save_every_n_steps == 7 and control.export_on_quit and control.save_on_quit


def test_invalid_arguments_name_the_argument():
    with pytest.raises(ValueError, match="save_every_n_steps"):
        TrainingControl(source=None, save_every_n_steps=-1)
    with pytest.raises(ValueError, match="check_every_n_steps"):
        TrainingControl(source=None, check_every_n_steps=0)
    with pytest.raises(ValueError, match="signal_command"):
        TrainingControl(source=None, signal_command="sav")
    with pytest.raises(ValueError, match="filename"):
        TrainingControl(source=None, filename="{nope}")
    with pytest.raises(ValueError, match="file_extension"):
        TrainingControl(source=None, file_extension="sft")
    with pytest.raises(ValueError, match="signal"):
        TrainingControl(source=None, signal="SIGNOPE")
    with pytest.raises(TypeError, match="source"):
        TrainingControl(source=3.5)


def test_state_dict_round_trip_restores_events(tmp_path):
    control, trainer = make(tmp_path, {1: ["export@7", "lr 0.5@9"]})
    control.setup(trainer, None, "fit")
    control.on_train_start(trainer, None)
    trainer.global_step = 1
    control.on_train_batch_end(trainer, None, None, None, 0)
    state = control.state_dict()
    assert state == {
        "events": [["export", 7], ["lr 0.5", 9]],
        "last_save_step": 0,
        "last_eval_step": 0,
        "last_export_step": 0,
    }
    fresh, trainer2 = make(tmp_path)
    fresh.load_state_dict(state)
    trainer2.global_step = 5  # resumed at step 5
    trace = drive(fresh, trainer2, 9)
    assert trace == [("save", 7), ("export", 7), ("save", 9)]  # no save at the resumed step 5
    assert trainer2.optimizers[0].param_groups[0]["lr"] == 0.5


# ---------------------------------------------------------------------------------------------
# real fits, in process
# ---------------------------------------------------------------------------------------------
def fit(tmp_path, control, model=None, callbacks=(), max_steps=6, **kwargs):
    model = model or RecordingModule()
    trainer = cpu_trainer(tmp_path, [control, *callbacks], max_steps=max_steps, **kwargs)
    trainer.fit(model)
    return trainer, model


def test_fit_commands_save_and_quit_with_real_trainer(tmp_path):
    holder = {}
    control = TrainingControl(
        source=StepScript(lambda: holder["t"].global_step, {2: ["lr 0.5", "garbage", "save"], 4: ["quit"]}),
        signal=None,
    )
    model = RecordingModule()
    trainer = holder["t"] = cpu_trainer(tmp_path, [control], max_steps=50)
    trainer.fit(model)
    assert trainer.global_step == 4  # fit returned normally after quit
    assert [s for s, lr in model.lr_trace if lr == 0.5] == [2, 3, 4]
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["step=2.ckpt", "step=4.ckpt"]
    ckpt = torch.load(tmp_path / "checkpoints" / "step=4.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    state = ckpt["callbacks"][control.state_key]
    assert state["last_save_step"] == 4
    assert control.source.closed == 1  # the reader is released at teardown


def test_fit_final_save_resume_and_no_save_at_resumed_step(tmp_path):
    control = TrainingControl(source=None, signal=None, save_every_n_steps=3)
    trainer, _ = fit(tmp_path, control, max_steps=4)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["step=3.ckpt", "step=4.ckpt"]  # periodic + final
    os.remove(tmp_path / "checkpoints" / "step=4.ckpt")
    resumed = TrainingControl(source=None, signal=None, save_every_n_steps=3)
    trainer = cpu_trainer(tmp_path, [resumed], max_steps=7)
    trainer.fit(RecordingModule(), ckpt_path=tmp_path / "checkpoints" / "step=3.ckpt")
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["step=3.ckpt", "step=6.ckpt", "step=7.ckpt"]


def test_fit_uses_model_checkpoint_dir_and_extension(tmp_path):
    class Sft(ModelCheckpoint):
        FILE_EXTENSION = ".ckpt2"

    control = TrainingControl(source=None, signal=None)
    ckpt = Sft(dirpath=tmp_path / "mine", save_top_k=0)
    fit(tmp_path, control, callbacks=[ckpt], enable_checkpointing=True, max_steps=2)
    assert (tmp_path / "mine" / "step=2.ckpt2").is_file()


def test_fit_eval_command_runs_the_validation_loop(tmp_path):
    holder = {}
    control = TrainingControl(
        source=StepScript(lambda: holder["t"].global_step, {2: ["eval"]}),
        signal=None,
        eval_every_n_steps=5,
        save_on_train_end=False,
    )
    model = RecordingModuleWithVal()
    trainer = holder["t"] = cpu_trainer(
        tmp_path,
        [control],
        max_steps=6,
        limit_val_batches=2,
        val_check_interval=1000,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    trainer.fit(model)
    assert model.val_steps == [2, 5]
    assert "val_loss" in trainer.callback_metrics
    assert trainer.global_step == 6 and model.training


def test_fit_eval_quit_before_first_step(tmp_path):
    holder = {}
    control = TrainingControl(source=StepScript(lambda: holder["t"].global_step, {0: ["eval_quit"]}), signal=None)
    model = RecordingModuleWithVal()
    trainer = holder["t"] = cpu_trainer(tmp_path, [control], max_steps=6, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(model)
    assert trainer.global_step == 0 and model.lr_trace == []
    assert model.val_steps == [0]
    assert not (tmp_path / "checkpoints").exists()


def test_fit_gradient_accumulation_commands_once_per_step(tmp_path):
    holder = {}
    evals = []
    control = TrainingControl(
        source=StepScript(lambda: holder["t"].global_step, {1: ["eval@2", "save"]}),
        eval_fn=lambda t, m: evals.append(t.global_step),
        signal=None,
        save_on_train_end=False,
    )
    trainer = holder["t"] = cpu_trainer(tmp_path, [control], max_steps=3, accumulate_grad_batches=2)
    trainer.fit(RecordingModule())
    assert evals == [2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step=1.ckpt"]


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 does not exist on this platform")
def test_fit_signal_only_sets_a_flag_and_saves_at_the_next_boundary(tmp_path):
    seen = {}

    class Signalling(RecordingModule):
        def training_step(self, batch, batch_idx):
            if self.trainer.global_step == 2:  # inside step 3, before its backward pass
                os.kill(os.getpid(), signal.SIGUSR1)
                # the handler has run by now; nothing may have been saved from inside it
                seen["files_in_handler"] = (
                    list((tmp_path / "checkpoints").glob("*")) if (tmp_path / "checkpoints").exists() else []
                )
            return super().training_step(batch, batch_idx)

    before = signal.getsignal(signal.SIGUSR1)
    control = TrainingControl(source=None, save_on_train_end=False)
    fit(tmp_path, control, model=Signalling(), max_steps=5)
    assert seen["files_in_handler"] == []
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step=3.ckpt"]
    assert signal.getsignal(signal.SIGUSR1) == before  # the previous handler is back


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="SIGUSR2 does not exist on this platform")
def test_fit_another_signal_runs_another_command(tmp_path):
    """``signal="SIGUSR2", signal_command="quit"``: SIGUSR2 during step 3 quits (saving first, as
    quit does) at that step's boundary; SIGUSR1 is left alone."""
    seen = {}
    usr1, usr2 = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGUSR2)

    class Signalling(RecordingModule):
        def training_step(self, batch, batch_idx):
            if self.trainer.global_step == 2:  # inside step 3
                seen["usr1_during_fit"] = signal.getsignal(signal.SIGUSR1)
                os.kill(os.getpid(), signal.SIGUSR2)
            return super().training_step(batch, batch_idx)

    control = TrainingControl(source=None, signal="SIGUSR2", signal_command="quit", save_on_train_end=False)
    trainer, _ = fit(tmp_path, control, model=Signalling(), max_steps=8)
    assert control.quit_requested and trainer.global_step == 3  # stopped at the boundary of step 3, not 8
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step=3.ckpt"]  # quit saves
    assert seen["usr1_during_fit"] == usr1  # the default signal was not taken
    assert signal.getsignal(signal.SIGUSR2) == usr2  # the previous handler is back


# ---------------------------------------------------------------------------------------------
# .sft checkpoints through lightning_utils.io
# ---------------------------------------------------------------------------------------------
def test_sft_save_through_checkpoint_io_and_resume_keeps_schedules(tmp_path):
    from lightning_utils.io import load_state

    holder = {}
    control = TrainingControl(
        source=StepScript(lambda: holder["t"].global_step, {1: ["export@9", "save"]}),
        signal=None,
        save_on_train_end=False,
    )
    # Lightning's default ModelCheckpoint is on (its FILE_EXTENSION is ".ckpt")
    trainer = holder["t"] = cpu_trainer(tmp_path, [control], max_steps=3, suffix=".sft", enable_checkpointing=True)
    trainer.fit(RecordingModule())
    path = tmp_path / "checkpoints" / "step=1.sft"  # the default ModelCheckpoint is .ckpt; the plugin picks .sft
    assert path.is_file()
    with open(path, "rb") as f:
        assert not f.read(16).startswith(b"PK")  # safetensors, not a torch zip
    state = load_state(path)
    assert state["callbacks"][control.state_key]["events"] == [["export", 9]]
    assert state["global_step"] == 1

    resumed = TrainingControl(source=None, signal=None, save_on_train_end=False)
    trainer = cpu_trainer(tmp_path, [resumed], max_steps=5, suffix=".sft")
    trainer.fit(RecordingModule(), ckpt_path=path)
    assert [str(c) for c, w in resumed.events] == ["export"] and resumed.events[0][1] == 9


def test_sft_extension_from_safetensors_model_checkpoint_and_explicit(tmp_path):
    from lightning_utils.callbacks.safetensors_model_checkpoint import SafetensorsModelCheckpoint
    from lightning_utils.io import load_state

    control = TrainingControl(source=None, signal=None)
    fit(
        tmp_path / "a",
        control,
        callbacks=[SafetensorsModelCheckpoint(dirpath=tmp_path / "a" / "ck", save_top_k=0)],
        enable_checkpointing=True,
        max_steps=2,
    )
    assert load_state(tmp_path / "a" / "ck" / "step=2.sft")["global_step"] == 2
    # an explicit ".sft" installs SafetensorsCheckpointIO, so the name never holds a pickle
    control = TrainingControl(source=None, signal=None, file_extension=".sft")
    fit(tmp_path / "b", control, max_steps=2)
    path = tmp_path / "b" / "checkpoints" / "step=2.sft"
    assert load_state(path)["global_step"] == 2
    with open(path, "rb") as f:
        assert not f.read(16).startswith(b"PK")


def test_callbacks_build_from_lightning_cli_class_paths(tmp_path):
    jsonargparse = pytest.importorskip("jsonargparse", reason="LightningCLI's parser (the 'cli' extra)")
    from lightning.pytorch.callbacks import Callback

    from lightning_utils.callbacks.export_weights import ExportWeights
    from lightning_utils.callbacks.metrics_printer import MetricsPrinter
    from lightning_utils.control.sources import FileSource

    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    cfg = parser.parse_args(
        [
            "--callbacks",
            json.dumps(
                [
                    {
                        "class_path": "lightning_utils.callbacks.training_control.TrainingControl",
                        "init_args": {
                            "source": str(tmp_path / "cmds.txt"),
                            "save_every_n_steps": 100,
                            "file_extension": ".sft",
                        },
                    },
                    {
                        "class_path": "lightning_utils.callbacks.export_weights.ExportWeights",
                        "init_args": {"dtype": "bf16"},
                    },
                    {
                        "class_path": "lightning_utils.callbacks.metrics_printer.MetricsPrinter",
                        "init_args": {"window": 50},
                    },
                ]
            ),
        ]
    )
    control, exporter, printer = parser.instantiate(cfg).callbacks
    assert isinstance(control, TrainingControl) and isinstance(control.source, FileSource)
    assert control.save_every_n_steps == 100 and control.file_extension == ".sft"
    assert isinstance(exporter, ExportWeights) and exporter.dtype == torch.bfloat16
    assert isinstance(printer, MetricsPrinter) and printer.window == 50


def test_configured_commands_schedule_without_duplicates_after_resume(tmp_path):
    control, trainer = make(tmp_path, commands=["quit@4", "export@6", "save"], save_on_train_end=False)
    assert drive(control, trainer, 12) == [("save", 4), ("quit", 4)]
    assert [(str(c), w) for c, w in control.events] == [("export", 6)]
    state = control.state_dict()
    resumed, trainer2 = make(tmp_path, commands=["export@6"], save_on_train_end=False)
    resumed.load_state_dict(state)
    trainer2.global_step = 4
    assert drive(resumed, trainer2, 7) == [("save", 6), ("export", 6)]  # once, though given twice
    with pytest.raises(ValueError, match=r"commands\[1\]"):
        TrainingControl(source=None, commands=["save", "sav"])


def test_eval_without_eval_fn_or_validation_step_warns_and_goes_on(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    trainer = FakeTrainer(tmp_path)
    control = TrainingControl(source=StepScript(lambda: trainer.global_step, {1: ["eval"]}), signal=None)
    drive(control, trainer, 3, pl_module=RecordingModule())
    assert "no eval_fn was given and the model has no validation_step" in caplog.text
    assert trainer.global_step == 3


def test_failing_eval_fn_is_reported_and_training_goes_on(tmp_path, caplog):
    def broken(trainer, module):
        raise RuntimeError("eval exploded")

    control, trainer = make(tmp_path, {1: ["eval"]}, eval_fn=broken)
    drive(control, trainer, 3)
    assert "eval_fn failed at step 1" in caplog.text and "eval exploded" in caplog.text
    assert trainer.global_step == 3


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 does not exist on this platform")
def test_slurm_auto_requeue_keeps_its_signal(tmp_path, caplog):
    from types import SimpleNamespace

    caplog.set_level(logging.INFO, logger=LOGGER)
    trainer = FakeTrainer(tmp_path)
    trainer.strategy.cluster_environment = SimpleNamespace(auto_requeue=True, requeue_signal=signal.SIGUSR1)
    before = signal.getsignal(signal.SIGUSR1)
    control = TrainingControl(source=None)
    control.setup(trainer, None, "fit")
    assert signal.getsignal(signal.SIGUSR1) == before  # Lightning installs its requeue handler instead
    assert "SLURM auto-requeue signal" in caplog.text
    control.teardown(trainer, None, "fit")
    control.on_train_start(trainer, None)  # where the handler would be installed
    assert signal.getsignal(signal.SIGUSR1) == before
    control.teardown(trainer, None, "fit")
    other = TrainingControl(source=None, signal="SIGUSR2")
    other.setup(trainer, None, "fit")
    other.on_train_start(trainer, None)
    assert signal.getsignal(signal.SIGUSR2) == other._signal._handler
    other.teardown(trainer, None, "fit")


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 does not exist on this platform")
def test_signal_handler_and_reader_released_after_a_failed_fit(tmp_path):
    # On an exception Lightning's own teardown runs after on_exception and re-installs the handlers
    # it found when the run started: ours must not be among them, or SIGUSR1 stays swallowed.
    class Boom(RecordingModule):
        def training_step(self, batch, batch_idx):
            if self.trainer.global_step == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    before = signal.getsignal(signal.SIGUSR1)
    source = StepScript(lambda: 0, {})
    control = TrainingControl(source=source)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, control, model=Boom(), max_steps=5)
    assert signal.getsignal(signal.SIGUSR1) == before
    assert source.closed == 1
    fit(tmp_path, control, max_steps=2)  # the same callback in a second fit: installed and released again
    assert signal.getsignal(signal.SIGUSR1) == before and source.closed == 2


@pytest.mark.parametrize("scheduler", ["lambda", "warmup", "onecycle", "step", "sequential"])
def test_fit_lr_command_is_where_the_schedule_continues_from(tmp_path, scheduler):
    # Closed-form schedulers recompute lr = base_lr * factor(step) after every optimizer step, so
    # setting base_lr = X turned 'lr 0.2' into 0.2 * factor (e.g. 0.1, or 0.08 during warmup) at
    # the very next step. The typed value must be the lr the schedule continues from: the lrs
    # after the command are X times the uncommanded run's, relative to the commanded step.
    from lightning_utils.optim import WarmupLR

    class Scheduled(RecordingModule):
        def configure_optimizers(self):
            opt = torch.optim.SGD([{"params": [self.layer.weight]}, {"params": [self.layer.bias], "lr": 0.05}], lr=0.1)
            sched = {
                "lambda": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5),
                "warmup": lambda: WarmupLR(opt, warmup_steps=10),  # linear warmup: factor (s+1)/10
                "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.1, 0.05], total_steps=20),
                "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.1),  # chainable
                "sequential": lambda: torch.optim.lr_scheduler.SequentialLR(
                    opt,
                    [  # schedulers inside one
                        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 + 0.1 * s),
                        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.25),
                    ],
                    milestones=[100],
                ),
            }[scheduler]()
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def run(script):
        holder = {}
        control = TrainingControl(
            source=StepScript(lambda: holder["t"].global_step, script), signal=None, save_on_train_end=False
        )
        model = Scheduled()
        trainer = holder["t"] = cpu_trainer(tmp_path, [control], max_steps=6)
        trainer.fit(model)
        return dict(model.lr_trace), trainer  # step -> the first group's lr after that step's scheduler step

    reference, _ = run({})
    commanded, trainer = run({3: ["lr 0.2"]})
    assert commanded[3] == pytest.approx(0.2)
    for step in (4, 5, 6):
        assert commanded[step] == pytest.approx(0.2 * reference[step] / reference[3])
    groups = trainer.optimizers[0].param_groups
    assert groups[0]["lr"] == pytest.approx(groups[1]["lr"])  # every group was set to 0.2, and continues alike


def test_fit_loss_scale_drives_a_real_grad_scaler(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    scales = []

    class Recording(RecordingModule):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            super().on_train_batch_end(outputs, batch, batch_idx)
            scales.append((self.trainer.global_step, self.trainer.precision_plugin.scaler.get_scale()))

    holder = {}
    control = TrainingControl(
        source=StepScript(lambda: holder["t"].global_step, {0: ["loss_scale 256"], 2: ["loss_scale 1024"]}),
        signal=None,
        save_on_train_end=False,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # fp16 AMP with a scaler, here on CPU
    trainer = holder["t"] = cpu_trainer(
        tmp_path, [control], max_steps=4, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    )
    trainer.fit(Recording())
    # before the first step the scaler has no scale yet: it starts from 256; at step 2 it is set
    assert scales == [(1, 256.0), (2, 1024.0), (3, 1024.0), (4, 1024.0)]
