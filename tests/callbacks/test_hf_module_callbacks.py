"""The module callbacks on stock Hugging Face models (tiny GPT-2, LLaMA with GQA, T5; library
defaults: ``use_cache=True``, dropout on): same outputs and gradients as the plain model, the
same state-dict keys (tied weights still tied), and a Lightning fit that resumes exactly.

``ReplaceModules`` swaps every ``nn.Linear`` (and GPT-2's ``Conv1D``) for a plain subclass; the
SDPA preset replaces ``nn.MultiheadAttention``, which these models do not use. ``CompileModules``
compiles the block classes with the ``eager`` backend (the test is about where and how it
compiles, not about code generation).
"""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers.hf_models import CASE_IDS, CASES, HFCase, build, loss_and_grads, max_grad_diff
from helpers.lightning import OptimizerHoldsModelParameters, cpu_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_utils.callbacks import (
    ActivationOffload,
    CompileModules,
    ReplaceModules,
    RNGStateCheckpoint,
    SafetensorsModelCheckpoint,
)
from lightning_utils.io import load_state
from lightning_utils.modules.offload import is_offloaded

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


class MyLinear(nn.Linear):
    """An exact replacement: same math, a marker to tell it apart."""


class MyConv1D(Conv1D):
    """GPT-2's own linear layer, likewise (built from its ``nf``/``nx`` attributes)."""


def _replace() -> list[pl.Callback]:
    return [ReplaceModules(nn.Linear, MyLinear), ReplaceModules(Conv1D, MyConv1D)]


def _compile(case: HFCase) -> list[pl.Callback]:
    return [CompileModules(target=case.blocks, backend="eager")]


def _tied(model: nn.Module) -> list[tuple[str, str]]:
    """The pairs of parameter names that share one tensor."""
    first: dict[int, str] = {}
    pairs = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            pairs.append((first[id(p)], name))
        else:
            first[id(p)] = name
    return pairs


# T5's blocks are compiled (inside their checkpoint) by the fit test below; tracing them twice
# more here would double this file's time.
_PAIRS = [(c, "replace") for c in CASES] + [(c, "compile") for c in CASES if not c.encoder_decoder]


@pytest.mark.parametrize(("case", "which"), _PAIRS, ids=[f"{w}-{c.name}" for c, w in _PAIRS])
def test_outputs_gradients_and_keys_equal_the_plain_model(case, which):
    plain = build(case)
    model = copy.deepcopy(plain)
    callbacks = _replace() if which == "replace" else _compile(case)
    for callback in callbacks:
        model = callback.apply(model)
    for step in range(2):
        out_plain, grads_plain = loss_and_grads(plain, case.batch(seed=step), seed=step)
        out, grads = loss_and_grads(model, case.batch(seed=step), seed=step)
        torch.testing.assert_close(out.logits, out_plain.logits, atol=1e-6, rtol=0)
        assert max_grad_diff(grads_plain, grads) <= 1e-6
    assert list(model.state_dict()) == list(plain.state_dict())
    assert _tied(model) == _tied(plain)
    if which == "replace":
        linears = [m for m in plain.modules() if isinstance(m, (nn.Linear, Conv1D))]
        replaced = [m for m in model.modules() if isinstance(m, (MyLinear, MyConv1D))]
        assert len(replaced) == len(linears) > 0
    else:
        assert len(callbacks[0].compiled) == sum(isinstance(m, case.blocks) for m in plain.modules()) > 0


class HFModule(pl.LightningModule):
    def __init__(self, case: HFCase) -> None:
        super().__init__()
        self.case = case
        self.model = build(case)

    def training_step(self, batch, batch_idx):
        input_ids, labels = batch
        loss = self.model(input_ids=input_ids, labels=labels).loss
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        batches = [self.case.batch(seed=i, length=12) for i in range(2)]
        ids = torch.cat([b["input_ids"] for b in batches])
        labels = torch.cat([b["labels"] for b in batches])
        # Its own generator: a DataLoader iterator draws its base seed from the global RNG when it
        # is created, which an epoch-end checkpoint does not see (it is drawn after the save in
        # the straight run, before the RNG restore in the resumed one).
        return DataLoader(TensorDataset(ids, labels), batch_size=2, generator=torch.Generator())  # 2 steps an epoch


class _Transformed(OptimizerHoldsModelParameters):
    """Checks at the start of training that every callback acted (the optimizer holds the
    replaced parameters: ``OptimizerHoldsModelParameters``)."""

    def __init__(self, case: HFCase) -> None:
        self.case = case

    def check_more(self, held, pl_module):
        modules = list(pl_module.model.modules())
        assert not any(type(m) in (nn.Linear, Conv1D) for m in modules)
        blocks = [m for m in modules if isinstance(m, self.case.blocks)]
        assert blocks and all(is_offloaded(b) for b in blocks)


def _fit(case: HFCase, root, max_epochs: int, callbacks: list[pl.Callback], ckpt_path=None) -> HFModule:
    pl.seed_everything(0)
    module = HFModule(case)
    ckpt = SafetensorsModelCheckpoint(dirpath=root / "ckpts", save_top_k=-1, every_n_epochs=1)
    trainer = cpu_trainer(root, [RNGStateCheckpoint(), ckpt, *callbacks], max_epochs=max_epochs, suffix=".sft")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "ActivationOffload: .* in training")  # tested in tests/modules
        trainer.fit(module, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fit_and_resume_with_all_three_callbacks(case, tmp_path):
    """Replace, offload and compile together: an interrupted run resumed from its `.sft` ends
    where the uninterrupted one does, and both end where the plain model's run does."""

    def callbacks() -> list[pl.Callback]:
        return [*_replace(), ActivationOffload(target=case.blocks), *_compile(case), _Transformed(case)]

    plain = _fit(case, tmp_path / "plain", 2, [])
    checks = callbacks()
    straight = _fit(case, tmp_path / "straight", 2, checks)
    assert checks[-1].ok
    _fit(case, tmp_path / "part", 1, callbacks())
    saved = sorted((tmp_path / "part" / "ckpts").glob("*.sft"))
    assert [p.name for p in saved] == ["epoch=0-step=2.sft"]
    state = load_state(saved[0])
    assert list(state["state_dict"]) == list(plain.state_dict())  # keys unchanged (tied: stored once)
    resumed = _fit(case, tmp_path / "resumed", 2, callbacks(), ckpt_path=saved[0])

    for name, want in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], want, atol=0, rtol=0, msg=name)
        torch.testing.assert_close(want, plain.state_dict()[name], atol=1e-5, rtol=0, msg=name)
    assert _tied(resumed.model) == _tied(plain.model)
