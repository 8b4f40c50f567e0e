"""ExportWeights: plain safetensors weights (dtype, metadata, tied weights, prefix), hooks, commands."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from control_scripts.fakes import StepScript
from control_scripts.recording_module import RecordingModule
from helpers.hf_export_models import HFModule, logits, tiny_model
from helpers.lightning import cpu_trainer
from safetensors import safe_open
from safetensors.torch import load_file

from lightning_utils.callbacks.export_weights import ExportWeights
from lightning_utils.callbacks.training_control import TrainingControl


class Tied(RecordingModule):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
        self.model[1].weight = self.model[0].weight  # tied, like an LM head
        self.register_buffer("counter", torch.tensor(7, dtype=torch.int64))


def fit(tmp_path, callbacks, model=None, **kwargs):
    trainer = cpu_trainer(tmp_path, callbacks, **kwargs)
    model = model or RecordingModule()
    trainer.fit(model)
    return trainer, model


def metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def fake_trainer(module, root, step=1, rank0=True, strategy=None):
    """What ExportWeights.export reads of a Trainer, without one."""
    return SimpleNamespace(
        global_step=step,
        current_epoch=0,
        is_global_zero=rank0,
        default_root_dir=str(root),
        strategy=strategy or SimpleNamespace(lightning_module_state_dict=module.state_dict),
        callback_metrics={},
        lightning_module=module,
    )


def test_export_on_train_end_bf16_with_metadata(tmp_path):
    exporter = ExportWeights(dtype="bf16")
    _, model = fit(tmp_path, [exporter], model=Tied(), max_steps=3)
    path = tmp_path / "export" / "weights-step=3.sft"
    assert exporter.last_path == path
    tensors = load_file(path)  # plain safetensors: no lightning_utils needed to read it
    sd = model.state_dict()
    assert set(tensors) == set(sd)
    assert tensors["layer.weight"].dtype == torch.bfloat16
    assert tensors["counter"].dtype == torch.int64 and int(tensors["counter"]) == 7  # ints never cast
    assert torch.equal(tensors["model.1.weight"], tensors["model.0.weight"])  # tied: written under both names
    fresh = Tied()
    fresh.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, strict=True)
    assert torch.allclose(fresh.layer.weight, model.layer.weight.detach(), atol=1e-2)
    meta = metadata(path)
    assert meta["format"] == "pt" and json.loads(meta["step"]) == 3 and meta["dtype"] == "bfloat16"
    assert json.loads(meta["hparams"])["lr"] == 0.1
    assert "loss" in json.loads(meta["metrics"])


def test_strip_prefix_dtype_none_extra_metadata_and_name(tmp_path):
    exporter = ExportWeights(
        dirpath=tmp_path / "hf",
        filename="model-{epoch}-{step}.safetensors",
        dtype=None,
        strip_prefix="model.",
        metadata=lambda t, m: {"symmap": {"a": 1}, "note": "hi"},
    )
    trainer, _ = fit(tmp_path, [exporter], model=Tied(), max_steps=2)
    path = tmp_path / "hf" / f"model-{trainer.current_epoch}-2.safetensors"  # Lightning's epoch at train end
    tensors = load_file(path)
    assert set(tensors) == {"0.weight", "1.weight"} and tensors["0.weight"].dtype == torch.float32
    meta = metadata(path)
    assert json.loads(meta["symmap"]) == {"a": 1} and meta["note"] == "hi"


def test_export_on_every_checkpoint(tmp_path):
    exporter = ExportWeights(export_on_checkpoint=True, export_on_train_end=False)
    control = TrainingControl(source=None, signal=None, save_every_n_steps=2)
    fit(tmp_path, [control, exporter], max_steps=4)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["weights-step=2.sft", "weights-step=4.sft"]


def test_training_control_export_command_uses_the_callback_in_trainer(tmp_path):
    holder = {}
    exporter = ExportWeights(dtype="fp16", export_on_train_end=True)
    control = TrainingControl(
        source=StepScript(lambda: holder["t"].global_step, {2: ["export"], 3: ["quit"]}),
        signal=None,
        save_on_export=False,
        export_on_quit=True,
        save_on_quit=False,
    )
    trainer = holder["t"] = cpu_trainer(tmp_path, [control, exporter], max_steps=50)
    trainer.fit(RecordingModule())
    # export at 2 (command), at 3 (quit); the train-end export of step 3 is not written twice
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["weights-step=2.sft", "weights-step=3.sft"]
    assert load_file(tmp_path / "export" / "weights-step=2.sft")["layer.weight"].dtype == torch.float16
    assert not (tmp_path / "checkpoints").exists()  # no save_on_export, no save_on_quit


def test_training_control_default_exporter(tmp_path):
    holder = {}
    control = TrainingControl(
        source=StepScript(lambda: holder["t"].global_step, {1: ["export"]}), signal=None, save_on_train_end=False
    )
    trainer = holder["t"] = cpu_trainer(tmp_path, [control], max_steps=2)
    trainer.fit(RecordingModule())
    assert load_file(tmp_path / "export" / "weights-step=1.sft")["layer.weight"].dtype == torch.float32
    assert (tmp_path / "checkpoints" / "step=1.ckpt").is_file()  # save_on_export, on by default


def test_only_global_rank_zero_writes(tmp_path):
    exporter = ExportWeights(dirpath=tmp_path)
    module = RecordingModule()
    trainer = fake_trainer(module, tmp_path, step=4, rank0=False)
    assert exporter.export(trainer, module) is None
    assert list(tmp_path.iterdir()) == []
    trainer.is_global_zero = True
    exporter = ExportWeights(dirpath=tmp_path)  # rank 0's own callback
    assert exporter.export(trainer, module) == tmp_path / "weights-step=4.sft"
    assert exporter.export(trainer, module) == tmp_path / "weights-step=4.sft"  # same step: not rewritten


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtype 'int8'"):
        ExportWeights(dtype="int8")
    with pytest.raises(ValueError, match="floating"):
        ExportWeights(dtype=torch.int32)
    with pytest.raises(ValueError, match="safetensors only"):
        ExportWeights(filename="weights.pt")
    with pytest.raises(ValueError, match="only {step} and {epoch}"):
        ExportWeights(filename="w-{loss}")


def test_nothing_under_prefix_is_a_clear_error(tmp_path):
    exporter = ExportWeights(dirpath=tmp_path, strip_prefix="nothing.")
    module = RecordingModule()
    trainer = fake_trainer(module, tmp_path)
    with pytest.raises(ValueError, match="no tensors under prefix 'nothing.'"):
        exporter.export(trainer, module)


class CountingTrainer(SimpleNamespace):
    """Counts the calls that are collectives on a real multi-rank strategy."""

    def __init__(self, module, rank, root):
        self.calls = []
        trainer = self

        class Strategy:
            def lightning_module_state_dict(self):
                trainer.calls.append("gather state dict")  # an all-gather under FSDP/DeepSpeed
                return module.state_dict()

        super().__init__(
            global_step=3, current_epoch=0, is_global_zero=rank == 0, default_root_dir=str(root), strategy=Strategy()
        )

    @property
    def callback_metrics(self):
        self.calls.append("callback_metrics")  # an all-reduce for epoch-level sync_dist metrics
        return {}


def test_every_rank_runs_the_same_collectives_when_a_step_was_already_exported(tmp_path):
    # e.g. `quit` with export_on_quit, then the train-end export at the same step: rank 0 skipped
    # the second gather while rank 1 ran it, a collective rank 0 never joins (a hang under FSDP).
    module = RecordingModule()
    traces = []
    for rank in (0, 1):
        exporter = ExportWeights(dirpath=tmp_path)
        trainer = CountingTrainer(module, rank, tmp_path)
        first = exporter.export(trainer, module)
        second = exporter.export(trainer, module)
        assert first == second == (tmp_path / "weights-step=3.sft" if rank == 0 else None)
        traces.append(trainer.calls)
    assert traces[0] == traces[1] == ["gather state dict", "callback_metrics"]


def test_metadata_reserved_keys_are_refused_up_front_and_values_round_trip(tmp_path):
    from lightning_utils.io import load_state

    for key in ("format", "module", "lightning_utils.skeleton", "lightning_utils.json_keys"):
        with pytest.raises(ValueError, match=rf"metadata.*{key}.*reserved"):
            ExportWeights(metadata={key: "x"})
    with pytest.raises(TypeError, match="metadata"):
        ExportWeights(metadata=3)
    exporter = ExportWeights(dirpath=tmp_path, metadata=lambda t, m: {"module": "oops"})
    module = RecordingModule()
    trainer = fake_trainer(module, tmp_path)
    with pytest.raises(ValueError, match=r"ExportWeights\(metadata=\.\.\.\).*'module' is reserved"):
        exporter.export(trainer, module)
    assert list(tmp_path.iterdir()) == []
    exporter = ExportWeights(dirpath=tmp_path, metadata={"note": "123", "symmap": {"a": 1}})
    path = exporter.export(trainer, module)
    state = load_state(path)  # what lightning_utils reads back: JSON values decoded, strings kept as strings
    assert state["note"] == "123" and state["symmap"] == {"a": 1} and state["step"] == 1
    assert state["hparams"]["lr"] == 0.1 and state["dtype"] == "float32"
    assert metadata(path)["step"] == "1"  # and plain safetensors sees JSON strings


def test_strip_prefix_matches_whole_module_names(tmp_path):
    # "model" means the submodule `model`: not "model_ema.*", and no keys starting with "."
    class Two(RecordingModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(2, 2)
            self.model_ema = torch.nn.Linear(2, 2)

    module = Two()
    trainer = fake_trainer(module, tmp_path)
    for prefix in ("model", "model."):
        path = ExportWeights(dirpath=tmp_path / prefix, strip_prefix=prefix).export(trainer, module)
        assert set(load_file(path)) == {"weight", "bias"}
        torch.nn.Linear(2, 2).load_state_dict(load_file(path))


# -- Hugging Face models: a directory that from_pretrained loads as it is ----------------------


def no_pickle_in(root):
    found = [p for p in Path(root).rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    assert found == []


def files_in(path):
    return sorted(p.name for p in Path(path).iterdir())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_export_is_a_directory_from_pretrained_loads_as_trained(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    holder = {}
    full = ExportWeights(dirpath=tmp_path / "fp32")  # the first ExportWeights: TrainingControl's exporter
    sharded = ExportWeights(dirpath=tmp_path / "bf16", dtype="bf16", max_shard_size=20_000)
    control = TrainingControl(
        source=StepScript(lambda: holder["t"].global_step, {1: ["export"]}), signal=None, save_on_export=False
    )
    trainer = holder["t"] = cpu_trainer(tmp_path, [control, full, sharded], max_steps=3)
    module = HFModule(arch)
    config_before = module.model.config.to_dict()
    trainer.fit(module)
    trained = module.model
    want = logits(trained)
    reference = tmp_path / "save_pretrained"  # transformers' own export of the trained model, as the oracle
    copy.deepcopy(trained).save_pretrained(reference)

    # fp32, one file: the files save_pretrained writes, the same names and the same tensors
    export = tmp_path / "fp32" / "weights-step=3"
    assert full.last_path == export
    assert files_in(export) == files_in(reference) == ["config.json", "generation_config.json", "model.safetensors"]
    ours, theirs = load_file(export / "model.safetensors"), load_file(reference / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    if arch == "gpt2":  # tied: written once, under the embedding's name, as transformers does
        assert "lm_head.weight" not in ours and "transformer.wte.weight" in ours
    config = json.loads((export / "config.json").read_text())
    assert config == json.loads((reference / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(export)
    assert type(loaded) is type(trained)
    assert torch.equal(logits(loaded), want)  # the trained model, not a random one
    assert (tmp_path / "fp32" / "weights-step=1" / "model.safetensors").is_file()  # TrainingControl's export

    # bf16, sharded: HF's model-0000k-of-0000n.safetensors and its index, split as save_pretrained splits
    export16 = tmp_path / "bf16" / "weights-step=3"
    reference16 = tmp_path / "save_pretrained_bf16"
    copy.deepcopy(trained).to(torch.bfloat16).save_pretrained(reference16, max_shard_size=20_000)
    assert files_in(export16) == files_in(reference16)
    shards = [n for n in files_in(export16) if n.startswith("model-")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((export16 / "model.safetensors.index.json").read_text())
    assert index == json.loads((reference16 / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    loaded16 = AutoModelForCausalLM.from_pretrained(export16)
    assert loaded16.dtype == torch.bfloat16
    for name, value in loaded16.named_parameters():  # the trained weights, rounded to bf16
        assert torch.equal(value, trained.get_parameter(name).detach().to(torch.bfloat16)), name
    torch.testing.assert_close(logits(loaded16), want, atol=0.1, rtol=0.05)  # bf16 rounding of the weights
    meta = metadata(export16 / shards[0])
    assert meta["format"] == "pt" and json.loads(meta["step"]) == 3 and meta["dtype"] == "bfloat16"
    no_pickle_in(tmp_path / "fp32")
    no_pickle_in(tmp_path / "bf16")
    assert trained.config.to_dict() == config_before  # the exports wrote copies of the live config


class TwoModels(RecordingModule):
    def __init__(self):
        super().__init__()
        self.student = tiny_model("llama")
        self.teacher = tiny_model("gpt2")


def test_hf_export_names_the_model_with_strip_prefix_and_refuses_guessing(tmp_path):
    from transformers import AutoModelForCausalLM

    module = TwoModels()
    trainer = fake_trainer(module, tmp_path)
    with pytest.raises(ValueError, match=r"several transformers models \('student', 'teacher'\).*strip_prefix"):
        ExportWeights(dirpath=tmp_path).export(trainer, module)
    assert list(tmp_path.iterdir()) == []
    path = ExportWeights(dirpath=tmp_path, strip_prefix="teacher").export(trainer, module)
    assert path == tmp_path / "weights-step=1" and path.is_dir()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(path)), logits(module.teacher))
    # hf_format=False: everything, as one plain file under the LightningModule's names
    plain = ExportWeights(dirpath=tmp_path / "plain", hf_format=False).export(trainer, module)
    assert plain == tmp_path / "plain" / "weights-step=1.sft"
    names = set(load_file(plain))
    assert "teacher.lm_head.weight" in names and "student.model.embed_tokens.weight" in names


def test_several_pretrained_models_without_strip_prefix_fail_when_fit_starts(tmp_path):
    """Not at the first export, hours in: ``fit`` stops in ``on_fit_start``, before any training step."""
    module = TwoModels()
    exporter = ExportWeights(export_on_train_end=True)
    with pytest.raises(ValueError, match=r"several transformers models \('student', 'teacher'\).*strip_prefix"):
        cpu_trainer(tmp_path, [exporter], max_steps=2).fit(module)
    assert module.losses == [] and module.lr_trace == []  # no training step ran
    assert exporter.last_path is None and not (tmp_path / "export").exists()


def test_hf_export_arguments_that_cannot_work_fail_when_fit_starts(tmp_path):
    with pytest.raises(ValueError, match="a Hugging Face export is a directory"):
        cpu_trainer(tmp_path, [ExportWeights(filename="w-{step}.sft")], max_steps=2).fit(HFModule("gpt2"))
    with pytest.raises(ValueError, match=r"max_shard_size=1000.*single \.sft file"):
        cpu_trainer(tmp_path, [ExportWeights(max_shard_size=1000)], max_steps=2).fit(RecordingModule())
    with pytest.raises(ValueError, match="holds no transformers PreTrainedModel"):
        cpu_trainer(tmp_path, [ExportWeights(hf_format=True)], max_steps=2).fit(RecordingModule())
    with pytest.raises(ValueError, match="hf_format=True, strip_prefix='layer.'.*a Linear"):
        cpu_trainer(tmp_path, [ExportWeights(hf_format=True, strip_prefix="layer")], max_steps=2).fit(RecordingModule())
    with pytest.raises(ValueError, match="max_shard_size"):
        ExportWeights(max_shard_size="lots")
    with pytest.raises(ValueError, match="max_shard_size.*hf_format=False"):
        ExportWeights(max_shard_size="5GB", hf_format=False)
    with pytest.raises(TypeError, match="hf_format"):
        ExportWeights(hf_format="yes")
    assert not (tmp_path / "export").exists()  # every failure came before the first step


def test_deepspeed_stage_3_is_refused_not_exported_empty(tmp_path):
    module = RecordingModule()
    strategy = SimpleNamespace(zero_stage_3=True, lightning_module_state_dict=module.state_dict)
    trainer = fake_trainer(module, tmp_path, strategy=strategy)
    with pytest.raises(ValueError, match="DeepSpeed ZeRO stage 3"):
        ExportWeights(dirpath=tmp_path).on_fit_start(trainer, module)  # before the first step
    with pytest.raises(ValueError, match="DeepSpeed ZeRO stage 3"):
        ExportWeights(dirpath=tmp_path).export(trainer, module)
    assert list(tmp_path.iterdir()) == []


def test_hf_export_replaces_an_existing_directory_whole_and_a_failure_leaves_it(tmp_path):
    module = HFModule("gpt2")
    trainer = fake_trainer(module, tmp_path)
    path = ExportWeights(dirpath=tmp_path, max_shard_size=20_000).export(trainer, module)
    assert any(n.startswith("model-") for n in files_in(path))
    (path / "stale.txt").write_text("from an older export")
    path = ExportWeights(dirpath=tmp_path).export(trainer, module)  # same step again, now unsharded
    assert files_in(path) == ["config.json", "generation_config.json", "model.safetensors"]
    assert files_in(tmp_path) == ["weights-step=1"]  # no staging left behind
    before = load_file(path / "model.safetensors")
    bad = ExportWeights(dirpath=tmp_path, metadata=lambda t, m: {"module": "reserved"})
    with pytest.raises(ValueError, match="reserved"):
        bad.export(trainer, module)
    assert files_in(tmp_path) == ["weights-step=1"]
    assert load_file(path / "model.safetensors").keys() == before.keys()


@pytest.mark.parametrize("kind", ["sft", "hf"])
def test_a_local_export_failing_mid_write_leaves_the_previous_one_as_it_was(tmp_path, monkeypatch, kind):
    """The write of the last tensor fails (a disk error, say): every earlier tensor, and for a
    sharded Hugging Face export every earlier weight file, was written by then. The previous export
    of that name is untouched, byte for byte, and nothing is left beside it."""
    from lightning_utils.io import weights

    module = HFModule("gpt2")
    trainer = fake_trainer(module, tmp_path)
    options = {"max_shard_size": 20_000} if kind == "hf" else {"hf_format": False}
    real_write, calls = weights.StreamingSafetensorsWriter.write, []
    fail_at = None

    def write(self, name, tensor):
        calls.append(name)
        if len(calls) == fail_at:
            raise OSError(5, "Input/output error (injected)")
        real_write(self, name, tensor)

    monkeypatch.setattr(weights.StreamingSafetensorsWriter, "write", write)
    path = ExportWeights(dirpath=tmp_path, **options).export(trainer, module)
    fail_at, tensors = len(calls), len(calls)  # the last tensor, this time
    calls.clear()
    before = {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert len(before) > (4 if kind == "hf" else 0)  # several weight files: the failure comes after the first
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)  # a different model: a half-written export would show
    with pytest.raises(OSError, match="injected"):
        ExportWeights(dirpath=tmp_path, **options).export(trainer, module)
    assert len(calls) == tensors > 1
    after = {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert after == before
    assert files_in(tmp_path) == [path.name]


def test_export_memory_is_one_tensor_at_a_time(tmp_path):
    module = HFModule("llama")
    trainer = fake_trainer(module, tmp_path)
    exporter = ExportWeights(dirpath=tmp_path / "bf16", dtype="bf16", hf_format=False)
    exporter.export(trainer, module)
    memory = exporter.last_memory
    largest = max(t.numel() * 2 for t in module.state_dict().values())
    total = sum(t.numel() * 2 for t in module.state_dict().values())
    assert memory.largest_tensor_bytes == largest < total / 4
    assert 0 < memory.peak_bytes <= largest  # each cast copy is freed before the next one is made
    exporter = ExportWeights(dirpath=tmp_path / "same", dtype=None, hf_format=False)
    exporter.export(trainer, module)
    assert exporter.last_memory.peak_bytes == 0  # nothing to cast: written straight from the parameters


def test_a_failed_export_can_be_retried_at_the_same_step(tmp_path):
    module = RecordingModule()
    trainer = fake_trainer(module, tmp_path)
    (tmp_path / "out").write_text("a file where the export folder should be")
    exporter = ExportWeights(dirpath=tmp_path / "out")
    with pytest.raises(OSError, match="out"):
        exporter.export(trainer, module)
    (tmp_path / "out").unlink()
    assert exporter.export(trainer, module) == tmp_path / "out" / "weights-step=1.sft"
    assert set(load_file(tmp_path / "out" / "weights-step=1.sft")) == set(module.state_dict())
