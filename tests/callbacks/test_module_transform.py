"""ModuleTransform and its three callbacks together: one Trainer with ReplaceModules,
ActivationOffload and CompileModules (order, resume, a second entry point), their shared
constructor arguments, logging and warnings."""

from __future__ import annotations

import inspect
import logging

import lightning.pytorch as pl
import pytest
import torch
from helpers.lightning import OptimizerHoldsModelParameters, cpu_trainer
from torch import nn

from lightning_utils.callbacks.activation_offload import ActivationOffload
from lightning_utils.callbacks.compile_modules import CompileModules
from lightning_utils.callbacks.module_transform import ModuleTransform
from lightning_utils.callbacks.replace_modules import ReplaceModules
from lightning_utils.io import load_state
from lightning_utils.modules.offload import is_offload_compiled, is_offloaded

_trainer = cpu_trainer


class MyLinear(nn.Linear):
    """An exact replacement: same math, a marker to tell it apart."""

    def forward(self, x):
        return super().forward(x)


class _Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(d, 16), nn.Linear(16, d), nn.Dropout(0.25)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.drop(self.fc2(torch.relu(self.fc1(x))))


class _StackLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.blocks = None
        self.head = nn.Linear(8, 8)

    def configure_model(self):
        if self.blocks is None:
            torch.manual_seed(0)
            self.blocks = nn.Sequential(_Block(), _Block())

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.head(self.blocks(x)) - x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.log("val", (self.head(self.blocks(x)) - x).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(16, 8, generator=g)), batch_size=4
        )

    val_dataloader = train_dataloader


def _three(counting):
    return [
        ReplaceModules(nn.Linear, MyLinear, include=["blocks"]),
        ActivationOffload(target=_Block),
        CompileModules(target=_Block, backend=counting),
    ]


def test_replace_offload_compile_in_one_trainer_fit_resume_validate(tmp_path):
    torch.compiler.reset()  # code compiled for _Block by another backend would be reused
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    pl.seed_everything(0)
    plain = _StackLM()
    _trainer(tmp_path / "plain", [], 3).fit(plain)

    pl.seed_everything(0)
    model = _StackLM()
    callbacks = _three(counting)
    trainer = _trainer(tmp_path / "a", [*callbacks, OptimizerHoldsModelParameters()], 3)
    trainer.fit(model)
    replace, offload, compile_ = callbacks
    assert replace.replaced == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    assert offload.wrapped == ["blocks.0", "blocks.1"] and compile_.compiled == ["blocks.0", "blocks.1"]
    # an offloaded block gets its own forward compiled, inside the checkpoint (never its call,
    # which would trace the checkpoint machinery): graphs for the no-grad forward and the recompute
    assert all(type(b.fc1) is MyLinear and is_offloaded(b) and is_offload_compiled(b) for b in model.blocks)
    assert all(b._compiled_call_impl is None for b in model.blocks)
    assert len(graphs) >= 2
    # same training as without any of them: exact replacement, dropout replayed, eager backend
    assert list(model.state_dict()) == list(plain.state_dict())
    for (k, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=k)
    # forward + recompute per training step, one plain call per sanity-check batch (no_grad)
    assert [b.calls for b in model.blocks] == [2 * 3 + 2, 2 * 3 + 2]

    # validate (setup runs again): nothing applied twice, no recompute under no_grad
    for b in model.blocks:
        b.calls = 0
    trainer.validate(model, verbose=False)
    assert len(replace.replaced) == 4 and len(offload.wrapped) == 2 and len(compile_.compiled) == 2
    assert [b.calls for b in model.blocks] == [4, 4]  # 4 validation batches, one call each

    ckpt = tmp_path / "three.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = _StackLM()
    trainer2 = _trainer(tmp_path / "b", [*_three(counting), OptimizerHoldsModelParameters()], 5)
    trainer2.fit(resumed, ckpt_path=ckpt)  # strict
    assert trainer2.global_step == 5
    assert set(load_state(ckpt)["state_dict"]) == set(plain.state_dict())


def test_wrong_callback_order_is_a_clear_error(tmp_path):
    class _SubBlock(_Block):
        pass

    def factory(name, old):
        return _SubBlock()

    callbacks = [ActivationOffload(target=_Block), ReplaceModules(_Block, factory)]
    with pytest.raises(ValueError, match="put ReplaceModules before"):
        _trainer(tmp_path, callbacks, 1).fit(_StackLM())


def test_the_three_callbacks_share_the_base_and_keep_their_constructors():
    """Users' YAML names these arguments and relies on these defaults."""
    expected = {
        ActivationOffload: {
            "target": inspect.Parameter.empty,
            "pin_memory": True,
            "min_bytes": 0,
            "offload": True,
            "include": None,
            "exclude": None,
            "verbose": False,
        },
        ReplaceModules: {
            "target": inspect.Parameter.empty,
            "replacement": inspect.Parameter.empty,
            "include": None,
            "exclude": None,
            "copy_weights": True,
            "verbose": False,
        },
        CompileModules: {
            "target": None,
            "backend": "inductor",
            "mode": None,
            "fullgraph": False,
            "dynamic": None,
            "options": None,
            "include": None,
            "exclude": None,
            "verbose": False,
        },
    }
    for cls, arguments in expected.items():
        assert issubclass(cls, ModuleTransform)
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert {p.name: p.default for p in parameters} == arguments, cls
        assert list(arguments) == [p.name for p in parameters], cls


def test_shared_arguments_are_read_the_same_way():
    for cb in (
        ActivationOffload(target="torch.nn.Linear", include=("a", "b"), exclude=iter(["c"])),
        ReplaceModules("torch.nn.Linear", MyLinear, include=("a", "b"), exclude=iter(["c"])),
        CompileModules(target="torch.nn.Linear", backend="eager", include=("a", "b"), exclude=iter(["c"])),
    ):
        assert cb.target == "torch.nn.Linear" and cb.include == ["a", "b"] and cb.exclude == ["c"]
    for make in (
        lambda: ActivationOffload(target=None),
        lambda: ReplaceModules(None, MyLinear),
        lambda: CompileModules(target="torch.nn.NoSuchLayer"),
    ):
        with pytest.raises((TypeError, ValueError), match="`target`"):
            make()
    assert CompileModules(backend="eager").target is None  # the LightningModule itself


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_verbose_logs_what_each_callback_did():
    from lightning_utilities.core import rank_zero

    handler = _Records()
    logger = rank_zero.log  # where rank_zero_info writes (Lightning puts its own logger there)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        net = nn.Sequential(_Block(), _Block())
        ReplaceModules(nn.Linear, MyLinear, verbose=True).apply(net)
        ActivationOffload(target=_Block, verbose=True).apply(net)
        CompileModules(target=_Block, backend="eager", verbose=True).apply(net)
        ActivationOffload(target=_Block, verbose=False).apply(nn.Sequential(_Block()))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage() for r in handler.records] == [
        "ReplaceModules: replaced 4 modules with ['MyLinear']: 0.fc1, 0.fc2, 1.fc1, 1.fc2",
        "ActivationOffload: wrapped 2 modules: 0, 1",
        "CompileModules: compiled ['0', '1']",
    ]


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        (lambda: ReplaceModules(nn.GRU, MyLinear), "ReplaceModules: no submodule matched .* nothing was replaced"),
        (lambda: CompileModules(target=nn.GRU, backend="eager"), "CompileModules: .* nothing was compiled"),
    ],
    ids=["replace", "compile"],
)
def test_callbacks_warn_when_nothing_matches(tmp_path, callback, message):
    with pytest.warns(UserWarning, match=message):
        _trainer(tmp_path, [callback()], 1).fit(_StackLM())


_NO_MATCH = [
    (lambda: ActivationOffload(target=nn.GRU), "ActivationOffload", "nothing is checkpointed"),
    (lambda: ReplaceModules(nn.GRU, MyLinear), "ReplaceModules", "nothing was replaced"),
    (lambda: CompileModules(target=nn.GRU, backend="eager"), "CompileModules", "nothing was compiled"),
]


@pytest.mark.parametrize(("callback", "label", "end"), _NO_MATCH, ids=["offload", "replace", "compile"])
def test_a_target_that_matches_nothing_is_named_in_the_warning(tmp_path, callback, label, end):
    message = rf"^{label}: no submodule matched target=torch\.nn\.modules\.rnn\.GRU; {end}$"
    with pytest.warns(UserWarning, match=message):
        _trainer(tmp_path, [callback()], 1).fit(_StackLM())
    with pytest.warns(UserWarning, match=message):  # outside a Trainer too
        callback().apply(nn.Sequential(_Block()))


def test_the_warning_names_import_paths_predicates_and_the_name_policy():
    def is_attention(name, module):
        return name.endswith("attn")

    cases = [
        (ReplaceModules("torch.nn.GRU", MyLinear), "target=torch.nn.GRU;"),
        (ActivationOffload(target=(nn.GRU, "torch.nn.LSTM")), "target=(torch.nn.modules.rnn.GRU, torch.nn.LSTM);"),
        (
            CompileModules(target=is_attention, backend="eager"),
            "target=predicate test_the_warning_names_import_paths_predicates_and_the_name_policy.<locals>.is_attention;",
        ),
        (ActivationOffload(target=_Block, include=["blocks"], exclude=["0"]), "include=['blocks'], exclude=['0'];"),
    ]
    for callback, expected in cases:
        with pytest.warns(UserWarning, match="no submodule matched") as record:
            callback.apply(nn.Sequential(_Block()))
        assert expected in str(record[0].message)


def test_no_warning_when_something_matched_or_was_transformed_before():
    import warnings

    net = nn.Sequential(_Block())
    offload = ActivationOffload(target=_Block)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        offload.apply(net)
        offload.apply(net)  # nothing new to wrap, but the target did match
