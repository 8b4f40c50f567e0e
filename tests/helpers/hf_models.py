"""Tiny ``transformers`` models built from configs (nothing downloaded), for the module tests.

Each model keeps the library's defaults that matter here: ``config.use_cache=True`` (so the
model hands its blocks a ``DynamicCache`` in training) and dropout on (LLaMA's attention dropout
defaults to 0, so it is set). Sizes: 2 layers, hidden size 32, a 97-token vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the tiny Hugging Face models need the `hf` extra")

VOCAB = 97


@dataclass
class HFCase:
    """One tiny model: how to build it, the block classes to target, and a training batch."""

    name: str
    build: Callable[[], nn.Module]
    blocks: tuple[type[nn.Module], ...]
    encoder_decoder: bool = False

    def batch(self, seed: int = 1, length: int = 12) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``labels`` (shorter target for the encoder-decoder), no padding."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (2, length), generator=g)
        labels = torch.randint(3, VOCAB, (2, 7), generator=g) if self.encoder_decoder else ids.clone()
        return {"input_ids": ids, "labels": labels}


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
    )
    return transformers.GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=64,
        attention_dropout=0.1,
    )
    return transformers.LlamaForCausalLM(config)


def _t5() -> nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return transformers.T5ForConditionalGeneration(config)


def _cases() -> list[HFCase]:
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.t5.modeling_t5 import T5Block

    return [
        HFCase("gpt2", _gpt2, (GPT2Block,)),
        HFCase("llama", _llama, (LlamaDecoderLayer,)),
        HFCase("t5", _t5, (T5Block,), encoder_decoder=True),
    ]


CASES = _cases()
CASE_IDS = [c.name for c in CASES]


def build(case: HFCase, seed: int = 0) -> nn.Module:
    """``case``'s model, initialised from ``seed``, in training mode."""
    torch.manual_seed(seed)
    return case.build().train()


def returned_cache(output: Any) -> Any:
    """The cache a model output carries (``cache`` in recent transformers, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def cache_length(cache: Any) -> int:
    """How many positions ``cache`` holds (self-attention, first layer)."""
    return 0 if cache is None else int(cache.get_seq_length())


def loss_and_grads(
    model: nn.Module, batch: dict[str, torch.Tensor], seed: int = 0
) -> tuple[Any, dict[str, torch.Tensor]]:
    """One training forward and backward from ``seed``: the model output and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    output = model(**batch)
    output.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return output, grads


def max_grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference over all gradients; both must hold the same names."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)
