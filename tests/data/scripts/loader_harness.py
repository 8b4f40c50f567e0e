"""Shared pieces of the loader's end-to-end tests (tests/data/test_loader*.py and the DDP script
beside this file): a dataset that returns its index, a tiny model that records the indices it
trains on, loader factories for every sampler, and the Trainer and checkpoint plumbing."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from helpers.lightning import cpu_trainer
from torch.utils.data import Dataset

from lightning_utils.data.loader import ResumableDataLoader
from lightning_utils.data.samplers import BatchedOrderedSampler, OrderedSampler, PoolSampler, RandomSampler

N_ITEMS = 22
BATCH_SIZE = 4

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*number of training batches.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
warnings.filterwarnings("ignore", ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


class IndexDataset(Dataset):
    def __init__(self, n: int = N_ITEMS) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i, dtype=torch.int64)


class RecordingModel(L.LightningModule):
    """Records every batch of indices it is trained on, in order, and every loss; the same
    initial weights in every run, so that two runs' losses can be compared."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        with torch.no_grad():
            self.layer.weight.fill_(0.5)
            self.layer.bias.fill_(0.1)
        self.seen: list[list[int]] = []
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.tolist())
        loss = self.layer(batch.float().view(-1, 1) / 10).pow(2).mean()
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class NoLenRandomSampler(RandomSampler):
    """A sampler without a length: Lightning then prefetches one batch to know when the loader ends."""

    def __len__(self) -> int:
        raise TypeError("this sampler has no length")


def _buckets() -> dict[int, list[tuple[str, float]]]:
    durations = [
        1.0,
        1.0,
        1.5,
        2.0,
        2.0,
        2.5,
        3.0,
        3.0,
        3.5,
        4.0,
        4.0,
        4.5,
        5.0,
        5.0,
        6.0,
        6.0,
        7.0,
        8.0,
        8.0,
        9.0,
        9.5,
        10.0,
    ]
    buckets: dict[int, list[tuple[str, float]]] = {}
    for i, d in enumerate(durations):
        buckets.setdefault(round(d), []).append((f"item{i}", d))
    return buckets


def make_loader(kind: str, num_workers: int = 0, **replicas: Any) -> ResumableDataLoader:
    ds = IndexDataset()
    kw: dict[str, Any] = {"num_workers": num_workers, "persistent_workers": False}
    if kind == "ordered":
        return ResumableDataLoader(ds, batch_size=BATCH_SIZE, sampler=OrderedSampler(len(ds), **replicas), **kw)
    if kind == "random":
        return ResumableDataLoader(ds, batch_size=BATCH_SIZE, sampler=RandomSampler(len(ds), seed=7, **replicas), **kw)
    if kind == "random_nolen":
        return ResumableDataLoader(
            ds, batch_size=BATCH_SIZE, sampler=NoLenRandomSampler(len(ds), seed=7, **replicas), **kw
        )
    if kind == "pool":
        return ResumableDataLoader(
            ds, batch_size=BATCH_SIZE, sampler=PoolSampler(range(len(ds)), seed=5, **replicas), **kw
        )
    if kind == "batched":
        sampler = BatchedOrderedSampler(
            _buckets(), max_duration=12, max_batch_size=4, shuffle=True, drop_last=False, seed=3, **replicas
        )
        return ResumableDataLoader(ds, batch_sampler=sampler, **kw)
    if kind == "default_shuffle":
        return ResumableDataLoader(ds, batch_size=BATCH_SIZE, shuffle=True, drop_last=True, **kw)
    raise ValueError(kind)


def make_trainer(
    root: Any, *, max_epochs: int = 2, max_steps: int = -1, callbacks: list | None = None, fmt: str = "ckpt", **kw: Any
) -> L.Trainer:
    """``helpers.lightning.cpu_trainer`` for ``max_epochs`` epochs, without a sanity check unless
    ``num_sanity_val_steps`` is given; ``fmt="sft"`` checkpoints through SafetensorsCheckpointIO."""
    kw.setdefault("num_sanity_val_steps", 0)
    return cpu_trainer(str(root), callbacks or [], max_steps=max_steps, suffix=f".{fmt}", max_epochs=max_epochs, **kw)


def fit(loader_factory: Callable[[], ResumableDataLoader], root: str, ckpt_path: str | None = None, **trainer_kw: Any):
    trainer, model = fit_model(loader_factory, root, ckpt_path, **trainer_kw)
    return trainer, model.seen


def fit_model(
    loader_factory: Callable[[], ResumableDataLoader], root: str, ckpt_path: str | None = None, **trainer_kw: Any
) -> tuple[L.Trainer, RecordingModel]:
    """:func:`fit`, returning the model (its ``seen`` indices and ``losses``)."""
    model = RecordingModel()
    trainer = make_trainer(root, **trainer_kw)
    trainer.fit(model, train_dataloaders=loader_factory(), ckpt_path=ckpt_path)
    return trainer, model


def _checkpoint_class(fmt: str) -> type[L.pytorch.callbacks.ModelCheckpoint]:
    if fmt == "sft":
        from lightning_utils.callbacks.safetensors_model_checkpoint import SafetensorsModelCheckpoint

        return SafetensorsModelCheckpoint
    return L.pytorch.callbacks.ModelCheckpoint


def every_n_steps_checkpoint(dirpath: str, n: int, fmt: str = "ckpt") -> L.pytorch.callbacks.ModelCheckpoint:
    """A checkpoint every ``n`` training steps, named ``step=<k>.<fmt>``."""
    return _checkpoint_class(fmt)(
        dirpath=dirpath, every_n_train_steps=n, save_top_k=-1, filename="{step}", save_on_train_epoch_end=False
    )


def epoch_end_checkpoint(dirpath: str, fmt: str = "ckpt") -> L.pytorch.callbacks.ModelCheckpoint:
    """ModelCheckpoint's default trigger (no validation): a checkpoint at every ``on_train_epoch_end``."""
    return _checkpoint_class(fmt)(dirpath=dirpath, save_top_k=-1, filename="{step}")


def load_checkpoint_file(path: str) -> dict:
    from lightning_utils.io import load_state

    return load_state(path, weights_only=False) if path.endswith(".ckpt") else load_state(path)


def ckpt_for_step(dirpath: str, step: int, fmt: str = "ckpt") -> str:
    path = os.path.join(dirpath, f"step={step}.{fmt}")
    assert os.path.exists(path), sorted(os.listdir(dirpath))
    return path
