"""A tiny next-token LM and token data shared by the optim Lightning tests and their scripts."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_utils.optim import ApolloMini, WarmupLR, apollo_param_groups

VOCAB = 32


class TokenData(L.LightningDataModule):
    """``n`` sequences where token t+1 = (token t + 1) % vocab: learnable in a few steps."""

    def __init__(self, n: int = 48, seq_len: int = 9, vocab: int = VOCAB, batch_size: int = 8) -> None:
        super().__init__()
        self.n, self.seq_len, self.vocab, self.batch_size = n, seq_len, vocab, batch_size

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(0)
        start = torch.randint(0, self.vocab, (self.n, 1), generator=gen)
        tokens = (start + torch.arange(self.seq_len)) % self.vocab
        return DataLoader(TensorDataset(tokens), batch_size=self.batch_size, shuffle=False)


class TinyLMBase(L.LightningModule):
    """No ``configure_optimizers``: LightningCLI supplies the optimizer and scheduler."""

    def __init__(self, vocab: int = VOCAB, d_model: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)  # same initial weights in every process
        self.embed = nn.Embedding(vocab, d_model)
        self.block = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.losses: list[float] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.block(h)
        return self.head(self.norm(h))

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        self.losses.append(loss.item())
        return loss


class TinyLM(TinyLMBase):
    """Builds APOLLO-Mini on the MLP matrices (by name) and AdamW elsewhere, plus WarmupLR."""

    def __init__(self, lr: float = 1e-2, update_proj_gap: int = 2, warmup_steps: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lr, self.update_proj_gap, self.warmup_steps = lr, update_proj_gap, warmup_steps

    def configure_optimizers(self):
        groups = apollo_param_groups(
            self,
            include=["block.*"],
            exclude=["*.bias"],
            apollo_options={"update_proj_gap": self.update_proj_gap},
            adamw_options={"weight_decay": 0.0},
        )
        optimizer = ApolloMini(groups, lr=self.lr, weight_decay=0.01)
        scheduler = WarmupLR(optimizer, warmup_steps=self.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class InjectedTinyLM(TinyLMBase):
    """LightningCLI dependency injection: the optimizer and scheduler come from YAML as callables,
    the module picks the APOLLO parameters by name and steps the scheduler every step."""

    def __init__(
        self,
        optimizer: OptimizerCallable,
        scheduler: LRSchedulerCallable,
        apollo_include: tuple[str, ...] = ("block.*",),
        apollo_exclude: tuple[str, ...] = ("*.bias",),
    ) -> None:
        super().__init__()
        self.optimizer, self.scheduler = optimizer, scheduler
        self.apollo_include, self.apollo_exclude = list(apollo_include), list(apollo_exclude)

    def configure_optimizers(self):
        groups = apollo_param_groups(self, include=self.apollo_include, exclude=self.apollo_exclude)
        optimizer = self.optimizer(groups)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": "step"}}
