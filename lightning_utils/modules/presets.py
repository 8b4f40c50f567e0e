"""Ready replacements for ``ReplaceModules``: low-precision Linear, 8-bit layers, SDPA attention.

Each preset is a factory ``(name, old) -> new`` usable as ``ReplaceModules(target, preset)``:

* ``torchao_linear(mode="auto")`` (extra ``lowp``: torchao). ``"float8"``: torchao's
  ``Float8Linear`` for training, on CUDA GPUs of compute capability >= 8.9 (Ada, Hopper and
  later). ``"int8_weight_only"``: torchao int8 weight-only quantization (weights become frozen
  int8 tensors: for inference or frozen layers; runs on CPU too). ``"auto"`` picks float8 where
  the GPU supports it, else int8 weight-only. Keys stay ``weight``/``bias``.
* ``bnb_linear_8bit()`` / ``bnb_stable_embedding()`` (extra ``bnb``: bitsandbytes).
  ``Linear8bitLt`` needs CUDA. ``StableEmbedding`` adds a LayerNorm (keys ``norm.weight`` and
  ``norm.bias`` appear) and is meant to be paired with bitsandbytes' 8-bit optimizers.
* ``SDPAMultiheadAttention`` / ``sdpa_attention()``: ``nn.MultiheadAttention`` computed with
  ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels), same parameters and keys.

Back ends are imported only when a preset is called; a missing one raises ``ImportError`` naming
the package and the extra, and a device that cannot run it raises ``RuntimeError`` saying why.
None of them is a dependency of the package. This module must never import torchao or
bitsandbytes at import time.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_utils._internals import shallow_copy_module

__all__ = [
    "SDPAMultiheadAttention",
    "bnb_linear_8bit",
    "bnb_stable_embedding",
    "float8_supported",
    "sdpa_attention",
    "torchao_linear",
]


def _require(package: str, extra: str, what: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"{what} needs the `{package.split('.')[0]}` package, which is not installed: "
            f"`pip install 'lightning-utils[{extra}]'` ({err})"
        ) from err


def float8_supported() -> bool:
    """True when a CUDA GPU of compute capability >= 8.9 (float8 matmuls) is present."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


class _Preset:
    """Base of the preset factories: ``copies_weights`` tells ReplaceModules to leave weights be."""

    copies_weights = True

    def __call__(self, name: str, old: nn.Module) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


_M = TypeVar("_M", bound=nn.Module)


def _expect(old: nn.Module, cls: type[_M], preset: str) -> _M:
    """``old`` itself, refused unless it is a ``cls``."""
    if not isinstance(old, cls):
        raise TypeError(f"{preset} replaces {cls.__name__} modules, got {type(old).__name__}")
    return old


class torchao_linear(_Preset):  # noqa: N801 - used like a function: ReplaceModules(nn.Linear, torchao_linear())
    """Low-precision ``nn.Linear`` through torchao (see the module docstring for the modes).

    Args:
        mode: ``"auto"``, ``"float8"`` or ``"int8_weight_only"``.
        config: a torchao config object for the chosen mode (``Float8LinearConfig`` /
            ``Int8WeightOnlyConfig``); torchao's defaults when ``None``.
    """

    MODES = ("auto", "float8", "int8_weight_only")

    def __init__(self, mode: str = "auto", config: Any = None) -> None:
        if mode not in self.MODES:
            raise ValueError(f"`mode` must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.config = config

    def resolved_mode(self) -> str:
        if self.mode == "auto":
            return "float8" if float8_supported() else "int8_weight_only"
        return self.mode

    def __call__(self, name: str, old: nn.Module) -> nn.Module:
        _expect(old, nn.Linear, "torchao_linear")
        _require("torchao", "lowp", "torchao_linear")
        mode = self.resolved_mode()
        if mode == "float8":
            if not float8_supported():
                found = (
                    f"compute capability {torch.cuda.get_device_capability()}"
                    if torch.cuda.is_available()
                    else "no CUDA device"
                )
                raise RuntimeError(
                    "torchao_linear(mode='float8') needs a CUDA GPU with compute capability >= 8.9 "
                    f"(Ada/Hopper or newer); found {found}. Use mode='int8_weight_only' or 'auto'"
                )
            from torchao.float8 import Float8LinearConfig
            from torchao.float8.float8_linear import Float8Linear

            # from_float reuses the Linear's weight and bias Parameters: keys and values stay.
            return Float8Linear.from_float(old, config=self.config or Float8LinearConfig())
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        new = copy.deepcopy(old)
        quantize_(new, self.config or Int8WeightOnlyConfig())
        return new


class bnb_linear_8bit(_Preset):  # noqa: N801 - used like a function: ReplaceModules(nn.Linear, bnb_linear_8bit())
    """bitsandbytes ``Linear8bitLt`` (LLM.int8()) in place of ``nn.Linear``; CUDA only.

    Args:
        has_fp16_weights: keep trainable high-precision weights (int8 matmul in the forward);
            ``False`` stores frozen int8 weights (adds ``SCB``/``weight_format`` state-dict keys).
        threshold: LLM.int8()'s outlier threshold: input features holding a value of larger
            magnitude are multiplied in 16-bit, the others in int8 (0 disables the split).
    """

    def __init__(self, has_fp16_weights: bool = True, threshold: float = 6.0) -> None:
        self.has_fp16_weights = has_fp16_weights
        self.threshold = threshold

    def __call__(self, name: str, old: nn.Module) -> nn.Module:
        linear = _expect(old, nn.Linear, "bnb_linear_8bit")
        bnb = _require("bitsandbytes", "bnb", "bnb_linear_8bit")
        if not torch.cuda.is_available():
            raise RuntimeError("bnb_linear_8bit: bitsandbytes' Linear8bitLt needs a CUDA GPU; none is available")
        new = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=self.has_fp16_weights,
            threshold=self.threshold,
        )
        # Int8Params quantizes when moved to CUDA (ReplaceModules or the strategy moves it).
        new.weight = bnb.nn.Int8Params(
            linear.weight.detach().clone(),
            requires_grad=self.has_fp16_weights and linear.weight.requires_grad,
            has_fp16_weights=self.has_fp16_weights,
        )
        if linear.bias is not None:
            new.bias = linear.bias
        return new


class bnb_stable_embedding(_Preset):  # noqa: N801 - used like a function: ReplaceModules(nn.Embedding, bnb_stable_embedding())
    """bitsandbytes ``StableEmbedding`` (embedding + LayerNorm, 32-bit optimizer state for it
    under bitsandbytes' 8-bit optimizers) in place of ``nn.Embedding``. Not output-identical:
    the LayerNorm is new (initialised to identity scale), and ``norm.*`` keys appear."""

    def __call__(self, name: str, old: nn.Module) -> nn.Module:
        embedding = _expect(old, nn.Embedding, "bnb_stable_embedding")
        bnb = _require("bitsandbytes", "bnb", "bnb_stable_embedding")
        new = bnb.nn.StableEmbedding(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            max_norm=embedding.max_norm,
            norm_type=embedding.norm_type,
            scale_grad_by_freq=embedding.scale_grad_by_freq,
            sparse=embedding.sparse,
        )  # (no dtype=: bitsandbytes 0.50 passes it to nn.Embedding in the device slot)
        new.weight = embedding.weight  # its LayerNorm stays float32: StableEmbedding normalises in fp32

        return new


class SDPAMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` that always computes with ``F.scaled_dot_product_attention``.

    Same constructor, parameters and state-dict keys as ``nn.MultiheadAttention``; the forward
    takes the same arguments. Attention weights are never materialised: the second output is
    ``None`` even when ``need_weights=True`` (callers such as ``nn.TransformerEncoderLayer`` pass
    ``need_weights=False`` anyway), unless ``weights_fallback=True``: then such calls run the
    stock implementation. ``add_bias_kv`` and ``add_zero_attn`` are not supported.
    Outputs equal the stock module's up to float rounding (dropout masks differ in training).
    """

    weights_fallback: bool = False

    def __init__(self, *args: Any, weights_fallback: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check_supported(self)
        self.weights_fallback = weights_fallback

    @staticmethod
    def _check_supported(m: nn.MultiheadAttention) -> None:
        if m.bias_k is not None or m.add_zero_attn:
            raise ValueError("SDPAMultiheadAttention does not support add_bias_kv=True or add_zero_attn=True")

    @classmethod
    def from_module(cls, old: nn.Module, weights_fallback: bool = False) -> SDPAMultiheadAttention:
        """The same module (same Parameter objects) re-classed; no weights are copied."""
        from lightning_utils.modules.swap import check_not_transformed

        mha = _expect(old, nn.MultiheadAttention, "SDPAMultiheadAttention")
        cls._check_supported(mha)
        # a copied instance-level forward / compiled call would keep running the stock forward
        check_not_transformed("", mha)
        new = shallow_copy_module(mha)
        new.__class__ = cls
        sdpa = cast(SDPAMultiheadAttention, new)  # re-classed: mypy cannot follow __class__
        sdpa.weights_fallback = weights_fallback
        return sdpa

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if need_weights and self.weights_fallback:
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        batched = query.dim() == 3
        if not batched:  # (L, E): add a batch dim where the layout expects it
            dim = 0 if self.batch_first else 1
            query, key, value = query.unsqueeze(dim), key.unsqueeze(dim), value.unsqueeze(dim)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)

        e, h = self.embed_dim, self.num_heads
        if self.in_proj_weight is not None:  # query, key and value of the same size, packed
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        n, l_q, _ = query.shape
        s = key.shape[1]
        q = F.linear(query, w_q, b_q).view(n, l_q, h, e // h).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(n, s, h, e // h).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(n, s, h, e // h).transpose(1, 2)

        mask = self._sdpa_mask(attn_mask, key_padding_mask, n, l_q, s, q.dtype, is_causal, q.device)
        causal = is_causal and attn_mask is None and key_padding_mask is None
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )
        out = out.transpose(1, 2).reshape(n, l_q, e)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
        return out, None

    def _sdpa_mask(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        n: int,
        l_q: int,
        s: int,
        dtype: torch.dtype,
        is_causal: bool,
        device: torch.device,
    ) -> Tensor | None:
        """MultiheadAttention masks (bool True = masked out, or additive float) as one additive
        float mask of shape broadcastable to (N, H, L, S), or None."""

        def additive(m: Tensor) -> Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            return m.to(dtype)

        mask = None
        if attn_mask is not None:
            mask = additive(attn_mask)
            if mask.dim() == 3:  # (N*H, L, S)
                mask = mask.view(n, self.num_heads, l_q, s)
        elif is_causal and key_padding_mask is not None:
            causal = torch.ones(l_q, s, dtype=torch.bool, device=device).triu(1)
            mask = additive(causal)
        if key_padding_mask is not None:
            kpm = additive(key_padding_mask).view(n, 1, 1, s)
            mask = kpm if mask is None else mask + kpm
        return mask


class sdpa_attention(_Preset):  # noqa: N801 - used like a function: ReplaceModules(nn.MultiheadAttention, sdpa_attention())
    """Factory form of ``SDPAMultiheadAttention.from_module`` (same Parameters, no copy)."""

    def __init__(self, weights_fallback: bool = False) -> None:
        self.weights_fallback = weights_fallback

    def __call__(self, name: str, old: nn.Module) -> nn.Module:
        return SDPAMultiheadAttention.from_module(old, weights_fallback=self.weights_fallback)
