"""Offloaded checkpointing of stock Hugging Face blocks: a recompute never updates a cache twice.

The models keep their defaults (``config.use_cache=True``, dropout on), so in training each block
is handed the model's ``DynamicCache`` (an ``EncoderDecoderCache`` for T5). Running such a block
again in backward would append its keys/values a second time (wrong gradients, or a shape error
for T5's cross-attention), so an offloaded block drops an empty cache in training (one warning)
and runs plainly when the cache already holds data or the model is in eval mode.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers.hf_models import (
    CASE_IDS,
    CASES,
    HFCase,
    build,
    cache_length,
    loss_and_grads,
    max_grad_diff,
    returned_cache,
)
from torch import nn

from lightning_utils.modules.offload import apply_activation_offload, offloaded_checkpoint, remove_activation_offload


def _offloaded(model: nn.Module, case: HFCase) -> nn.Module:
    twin = copy.deepcopy(model)
    assert apply_activation_offload(twin, case.blocks)
    return twin


def _cache_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "ActivationOffload" in str(w.message)]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_equal_the_plain_model_with_the_default_cache(case):
    plain = build(case)
    assert plain.config.use_cache is True  # the library's default, untouched
    offloaded = _offloaded(plain, case)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(2):  # the second step after an SGD update of both
            batch = case.batch(seed=step)
            out_plain, grads_plain = loss_and_grads(plain, batch, seed=step)
            out_off, grads_off = loss_and_grads(offloaded, batch, seed=step)
            assert float(out_off.loss) == pytest.approx(float(out_plain.loss), abs=1e-6)
            assert max_grad_diff(grads_plain, grads_off) <= 1e-6
            with torch.no_grad():
                for model, grads in ((plain, grads_plain), (offloaded, grads_off)):
                    for n, p in model.named_parameters():
                        if n in grads:
                            p -= 0.5 * grads[n]
    messages = _cache_warnings(record)
    assert len(messages) == 1, messages  # one warning for the whole run, not one per block or step
    assert "cache" in messages[0] and "use_cache=False" in messages[0]
    assert f"cache ({type(returned_cache(out_plain)).__name__})" in messages[0]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_use_cache_false_gives_equal_gradients_without_a_warning(case):
    plain = build(case)
    offloaded = _offloaded(plain, case)
    batch = {**case.batch(), "use_cache": False}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, grads_plain = loss_and_grads(plain, batch)
        _, grads_off = loss_and_grads(offloaded, batch)
    assert max_grad_diff(grads_plain, grads_off) <= 1e-6
    assert _cache_warnings(record) == []


def _self_attention_lengths(cache) -> list[int]:
    """Positions held per layer of the (self-attention) cache a model returned."""
    cache = getattr(cache, "self_attention_cache", cache)
    return [int(cache.get_seq_length(layer)) for layer in range(len(cache.layers))]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_the_returned_cache_holds_nothing_for_the_offloaded_blocks(case):
    """Only the first (decoder) block offloaded: in the cache a training forward returns, that
    block's layer holds nothing while the other layer holds every position, as without offloading."""
    plain = build(case)
    first = next(n for n, m in plain.named_modules() if isinstance(m, case.blocks) and "encoder" not in n)
    offloaded = copy.deepcopy(plain)
    assert apply_activation_offload(offloaded, case.blocks, include=[first]) == [first]
    batch = case.batch()
    length = batch["labels" if case.encoder_decoder else "input_ids"].shape[1]
    out_plain, grads_plain = loss_and_grads(plain, batch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out_off, grads_off = loss_and_grads(offloaded, batch)
    assert _self_attention_lengths(returned_cache(out_plain)) == [length, length]
    assert _self_attention_lengths(returned_cache(out_off)) == [0, length]
    if case.encoder_decoder:  # the cross-attention cache likewise
        cross = returned_cache(out_off).cross_attention_cache
        assert [int(cross.get_seq_length(layer)) for layer in range(2)] == [0, batch["input_ids"].shape[1]]
    assert max_grad_diff(grads_plain, grads_off) <= 1e-6  # the output is unchanged by the dropped cache
    messages = _cache_warnings(record)
    assert len(messages) == 1 and first in messages[0] and "holds nothing" in messages[0], messages


def _built_without_cache(case: HFCase) -> nn.Module:
    """``case``'s model built from its config with ``use_cache=False`` (as ``from_pretrained(..., use_cache=False)`` does)."""
    config = copy.deepcopy(build(case).config)
    config.use_cache = False
    torch.manual_seed(0)
    return type(build(case))(config).train()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_a_model_built_with_use_cache_false_trains_without_a_warning(case):
    plain = _built_without_cache(case)
    offloaded = _offloaded(plain, case)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out_plain, grads_plain = loss_and_grads(plain, case.batch())
        out_off, grads_off = loss_and_grads(offloaded, case.batch())
    assert _cache_warnings(record) == []
    assert returned_cache(out_plain) is None and returned_cache(out_off) is None
    assert max_grad_diff(grads_plain, grads_off) <= 1e-6


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_setting_config_use_cache_on_a_built_model(case):
    """``model.config.use_cache = False`` after building silences the warning for decoder-only
    models; T5's decoder keeps its own copy of the config, so there it still gets a cache."""
    plain = build(case)
    plain.config.use_cache = False
    offloaded = _offloaded(plain, case)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, grads_plain = loss_and_grads(plain, case.batch())
        _, grads_off = loss_and_grads(offloaded, case.batch())
    assert max_grad_diff(grads_plain, grads_off) <= 1e-6
    assert len(_cache_warnings(record)) == (1 if case.encoder_decoder else 0)


@pytest.mark.filterwarnings("ignore:ActivationOffload")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_generation_after_training_uses_the_cache(case):
    model = build(case)
    offloaded = _offloaded(model, case)
    loss_and_grads(offloaded, case.batch())
    with torch.no_grad():
        for p in offloaded.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    plain = copy.deepcopy(offloaded)
    assert remove_activation_offload(plain)
    offloaded.eval()
    plain.eval()
    prompt = case.batch(seed=5, length=6)["input_ids"]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True, "pad_token_id": 0}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = offloaded.generate(prompt, **kwargs)
    want = plain.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    # the cache was filled as it is without offloading: every position but the last generated one
    expected = want.sequences.shape[1] - 1
    assert cache_length(returned_cache(got)) == cache_length(returned_cache(want)) == expected
    assert _cache_warnings(record) == []  # generate runs without grad: nothing is checkpointed


@pytest.mark.parametrize("case", [c for c in CASES if not c.encoder_decoder], ids=["gpt2", "llama"])
def test_cached_forward_in_eval_mode_with_grad_enabled(case):
    """Eval mode with grad on (no ``no_grad``): the blocks run plainly, the cache fills, the
    incremental logits equal the full forward's, and gradients still flow."""
    offloaded = _offloaded(build(case), case).eval()
    ids = case.batch(seed=3)["input_ids"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = offloaded(ids[:, :8], use_cache=True)
        cache = returned_cache(first)
        assert cache_length(cache) == 8
        second = offloaded(ids[:, 8:], **{_cache_kwarg(offloaded): cache}, use_cache=True)
    assert cache_length(returned_cache(second)) == 12
    full = offloaded(ids, use_cache=False).logits
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), full, atol=1e-5, rtol=1e-5)
    second.logits.sum().backward()
    assert all(p.grad is not None for p in offloaded.lm_head.parameters())
    messages = _cache_warnings(record)
    assert len(messages) == 1 and "without checkpointing" in messages[0], messages


def _cache_kwarg(model: nn.Module) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def test_training_on_a_cache_that_holds_a_prefix_runs_plainly():
    """A cache that already holds positions (a prompt, prefix tuning) cannot be dropped: the block
    runs plainly (updated once, exact gradients) with one warning."""
    case = CASES[0]
    plain = build(case)
    offloaded = _offloaded(plain, case)
    ids = case.batch(seed=4)["input_ids"]
    results = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for model in (plain, offloaded):
            torch.manual_seed(7)
            with torch.no_grad():
                prefix = returned_cache(model(ids[:, :5], use_cache=True))
            out, grads = loss_and_grads(
                model, {"input_ids": ids[:, 5:], "labels": ids[:, 5:], _cache_kwarg(model): prefix}
            )
            assert cache_length(returned_cache(out)) == 12  # prefix + this call, each written once
            results.append(grads)
    assert max_grad_diff(*results) <= 1e-6
    messages = _cache_warnings(record)
    assert len(messages) == 1 and "without checkpointing" in messages[0], messages


class _ListCache:
    """A cache that is not a transformers ``Cache`` but follows its protocol (update/get_seq_length)."""

    def __init__(self) -> None:
        self.items: list[torch.Tensor] = []

    def update(self, t: torch.Tensor) -> torch.Tensor:
        self.items.append(t)
        return torch.cat(self.items, dim=0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return sum(t.shape[0] for t in self.items)


class _CachingBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, cache: _ListCache | None = None) -> torch.Tensor:
        y = self.fc(x)
        if cache is not None:
            y = cache.update(y)
        return y.tanh()


def test_a_cache_like_object_is_updated_once():
    block = _CachingBlock()
    twin = copy.deepcopy(block)
    apply_activation_offload(twin, _CachingBlock)
    x = torch.randn(3, 4, requires_grad=True)
    grads = []
    caches = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for model in (block, twin):
            cache = _ListCache()
            cache.update(torch.zeros(2, 4))
            model(x, cache).sum().backward()
            caches.append(cache)
            grads.append({n: p.grad for n, p in model.named_parameters()})
    assert [len(c.items) for c in caches] == [2, 2]
    assert max_grad_diff(*grads) == 0.0
    assert len(_cache_warnings(record)) == 1


def test_offloaded_checkpoint_function_never_updates_a_cache_twice():
    fc = nn.Linear(4, 4)
    cache = _ListCache()
    x = torch.randn(3, 4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # given once per process for this function
        out = offloaded_checkpoint(lambda t, c: c.update(fc(t)).tanh(), x, cache, params=list(fc.parameters()))
    out.sum().backward()
    assert len(cache.items) == 1
    assert x.grad is not None and fc.weight.grad is not None


def test_limit_attentions_kept_by_hooks_carry_no_gradient():
    """The documented limit: attention weights Hugging Face collects with forward hooks on the
    attention modules (``output_attentions=True``) come from the block's no-grad forward, while
    the hidden states it collects at the block itself (its return value) keep their gradient."""
    case = CASES[1]  # LLaMA
    model = build(case)
    model.config._attn_implementation = "eager"  # the implementation that returns attention weights
    plain = copy.deepcopy(model)
    offloaded = _offloaded(model, case)
    batch = {**case.batch(), "use_cache": False, "output_attentions": True, "output_hidden_states": True}
    torch.manual_seed(0)
    want = plain(**batch)
    torch.manual_seed(0)
    got = offloaded(**batch)
    assert all(a.requires_grad for a in want.attentions)
    assert not any(a.requires_grad for a in got.attentions)
    assert all(h.requires_grad for h in got.hidden_states)
    for a, b in zip(want.attentions, got.attentions):
        torch.testing.assert_close(b, a.detach(), atol=1e-6, rtol=0)  # same values, dropout replayed
