"""Tiny ``transformers`` models built from configs (no downloads) in a LightningModule, for the export tests.

``HFModule(arch)`` holds ``self.model``: a 2-layer GPT-2 (``GPT2LMHeadModel``, ``lm_head`` tied to
the token embedding) or LLaMA (``LlamaForCausalLM``, grouped-query attention, untied head). With
``fsdp=True`` its ``configure_model`` shards every block and then the whole model with FSDP2
(``fully_shard`` on the data-parallel mesh of Lightning's ``ModelParallelStrategy``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

VOCAB = 64


def tiny_config(arch: str) -> Any:
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
        )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=0,
        )
    raise ValueError(arch)


def tiny_model(arch: str) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch))


def blocks(model: Any) -> list[torch.nn.Module]:
    inner = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    return list(inner)


def sample_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


class HFModule(pl.LightningModule):
    def __init__(self, arch: str = "gpt2", fsdp: bool = False, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_model(arch)
        self.fsdp = fsdp

    def configure_model(self) -> None:
        if not self.fsdp:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in blocks(self.model):
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(0, VOCAB, (32, 12), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(ids), batch_size=4)


@torch.no_grad()
def logits(model: Any, ids: torch.Tensor | None = None) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(input_ids=sample_ids() if ids is None else ids).logits.float()
    finally:
        model.train(was_training)
