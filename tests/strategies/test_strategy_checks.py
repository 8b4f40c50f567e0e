"""Which strategies may write ``.sft`` checkpoints, and the drop-in's signature."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.strategies import ModelParallelStrategy as LightningModelParallelStrategy

from lightning_utils.callbacks import SafetensorsModelCheckpoint
from lightning_utils.plugins import check_strategy_writes_through_checkpoint_io
from lightning_utils.strategies import ModelParallelStrategy


def test_lightnings_model_parallel_strategy_is_refused_with_the_drop_in_named():
    callback = SafetensorsModelCheckpoint(dirpath="unused")
    trainer = SimpleNamespace(strategy=LightningModelParallelStrategy())
    with pytest.raises(RuntimeError, match=r"Use lightning_utils\.strategies\.ModelParallelStrategy instead"):
        callback.setup(trainer, None, "fit")  # type: ignore[arg-type]
    check_strategy_writes_through_checkpoint_io(
        LightningModelParallelStrategy(), "run/last.ckpt"
    )  # .ckpt: Lightning's own path


def test_our_model_parallel_strategy_writes_sft():
    check_strategy_writes_through_checkpoint_io(ModelParallelStrategy(), ".sft")
    check_strategy_writes_through_checkpoint_io(
        ModelParallelStrategy(save_distributed_checkpoint=False), "ckpts/step=5.sft"
    )


def test_fsdp1_keeps_its_refusal():
    # Lightning 2.6.6 runs FSDPStrategy on GPUs only, so the sharded .sft path is not offered for it.
    with pytest.raises(RuntimeError, match="FSDPStrategy bypasses the CheckpointIO plugin"):
        check_strategy_writes_through_checkpoint_io(FSDPStrategy(state_dict_type="sharded"), ".sft")


def test_deepspeed_is_refused_at_setup_with_the_strategy_and_the_alternative_named(tmp_path):
    # DeepSpeed is not installed here and its __init__ insists on it; the refusal only looks at the
    # strategy's type, so an instance without its __init__ run is the strategy as the check sees it.
    strategy = object.__new__(DeepSpeedStrategy)
    callback = SafetensorsModelCheckpoint(dirpath=tmp_path)
    trainer = SimpleNamespace(strategy=strategy)
    with pytest.raises(RuntimeError) as raised:
        callback.setup(trainer, None, "fit")  # type: ignore[arg-type]
    message = str(raised.value)
    assert "DeepSpeedStrategy bypasses the CheckpointIO plugin" in message
    assert "DeepSpeed writes its own checkpoint directories" in message
    assert "cannot write or resume '.sft' checkpoints; use '.ckpt' with this strategy" in message
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    check_strategy_writes_through_checkpoint_io(strategy, "run/last.ckpt")  # .ckpt: DeepSpeed's own path


def test_the_drop_in_takes_lightnings_arguments():
    ours = inspect.signature(ModelParallelStrategy.__init__).parameters
    theirs = inspect.signature(LightningModelParallelStrategy.__init__).parameters
    assert list(ours) == list(theirs)
    assert all(ours[name].default == theirs[name].default for name in ours)
    assert issubclass(ModelParallelStrategy, LightningModelParallelStrategy)
