"""Tests for lightning_utils.patterns: known layouts, property tests against plain-loop references."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lightning_utils.patterns import (
    CoarseFirstPattern,
    CodebooksPatternProvider,
    DelayedPatternProvider,
    LayoutCoord,
    MusicLMPattern,
    ParallelPatternProvider,
    Pattern,
    UnrolledPatternProvider,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- plain-loop references
# Straightforward definitions of each layout and of the three conversions, one Python loop per
# entry, written from the documented semantics. The library must agree with them exactly.


def ref_delayed(n_q, delays, timesteps, flatten_first=0, empty_initial=0):
    out = [] if empty_initial < 0 else [[]]
    out += [[] for _ in range(max(0, empty_initial))]
    for t in range(min(timesteps, flatten_first)):
        for q in range(n_q):
            out.append([LayoutCoord(t, q)])
    for step_t in range(flatten_first, timesteps + max(delays)):
        out.append([LayoutCoord(step_t - d, q) for q, d in enumerate(delays) if step_t - d >= flatten_first])
    return out


def ref_unrolled(n_q, flattening, delays, timesteps):
    groups = {}
    for q, (inner, d) in enumerate(zip(flattening, delays)):
        groups.setdefault(inner, ([], d))[0].append(q)
    end = timesteps + max(delays)
    entries = [(-1, [])]
    for t in range(end):
        for inner in range(max(flattening) + 1):
            if inner in groups:
                qs, d = groups[inner]
                if t + d < end:
                    entries.append((t + d, [LayoutCoord(t, q) for q in qs]))
            else:
                entries.append((t, []))
    return [coords for _, coords in sorted(entries)]


def ref_coarse_first(n_q, delays, timesteps):
    out = [[]] + [[LayoutCoord(t, 0)] for t in range(timesteps)]
    for step_t in range(timesteps + max(delays)):
        out.append([LayoutCoord(step_t - d, q + 1) for q, d in enumerate(delays) if step_t - d >= 0])
    return out


def ref_musiclm(n_q, group_by, timesteps):
    out = [[]]
    for first in range(0, n_q, group_by):
        for t in range(timesteps):
            for q in range(first, first + group_by):
                out.append([LayoutCoord(t, q)])
    return out


def ref_max_delay(layout, timesteps):
    return max([c.t + 1 for coords in layout[1:] for c in coords], default=0) - timesteps


def ref_valid_steps(layout, timesteps):
    return len(layout[: len(layout) - ref_max_delay(layout, timesteps)])


def ref_build(layout, z, special, keep, timesteps):
    b, k, t_in = z.shape
    steps = layout[: ref_valid_steps(layout, timesteps)] if keep else layout
    out = torch.full((b, k, len(steps)), special, dtype=z.dtype)
    mask = torch.zeros((k, len(steps)), dtype=torch.bool)
    for s, coords in enumerate(steps):
        for c in coords:
            if c.t < t_in:
                out[:, c.q, s] = z[:, c.q, c.t]
                mask[c.q, s] = True
    return out, mask


def ref_revert(layout, seq, special, keep, timesteps, model_output=False):
    """seq: [B, K, S] or [B, card, K, S]; returns values on the [.., K, timesteps] timeline."""
    k, n_steps = seq.shape[-2], seq.shape[-1]
    steps = layout[: ref_valid_steps(layout, timesteps)] if keep else layout
    shift = 1 if model_output and len(layout[0]) == 0 else 0
    out = torch.full((*seq.shape[:-1], timesteps), special, dtype=seq.dtype)
    mask = torch.zeros((k, timesteps), dtype=torch.bool)
    for s, coords in enumerate(steps):
        pos = s - shift
        if pos < 0 or pos >= n_steps:
            continue
        for c in coords:  # later steps overwrite earlier ones
            if c.t < timesteps:
                out[..., c.q, c.t] = seq[..., c.q, pos]
                mask[c.q, c.t] = True
    return out, mask


# --------------------------------------------------------------------------- strategies


@st.composite
def sorted_ints(draw, length, max_value=4):
    return sorted(draw(st.lists(st.integers(0, max_value), min_size=length, max_size=length)))


@st.composite
def providers(draw):
    """(provider, reference layout function of timesteps) for every provider kind."""
    kind = draw(st.sampled_from(["delayed", "parallel", "unrolled", "coarse", "musiclm"]))
    if kind == "delayed":
        n_q = draw(st.integers(1, 5))
        delays = draw(st.none() | sorted_ints(n_q))
        ff = draw(st.integers(0, 3))
        ei = draw(st.integers(-1, 2))
        d = list(range(n_q)) if delays is None else delays
        return DelayedPatternProvider(n_q, delays, flatten_first=ff, empty_initial=ei), (
            lambda t: ref_delayed(n_q, d, t, ff, ei)
        )
    if kind == "parallel":
        n_q = draw(st.integers(1, 5))
        return ParallelPatternProvider(n_q), (lambda t: ref_delayed(n_q, [0] * n_q, t))
    if kind == "unrolled":
        n_q = draw(st.integers(1, 5))
        flattening = draw(st.none() | sorted_ints(n_q, max_value=5))
        f = list(range(n_q)) if flattening is None else flattening
        # codebooks sharing an inner step share a delay: draw one delay per inner step, sorted
        per_inner = draw(sorted_ints(max(f) + 1))
        delays = draw(st.sampled_from([None, [per_inner[i] for i in f]]))
        dl = [0] * n_q if delays is None else delays
        return UnrolledPatternProvider(n_q, flattening, delays), (lambda t: ref_unrolled(n_q, f, dl, t))
    if kind == "coarse":
        n_q = draw(st.integers(2, 5))
        delays = draw(st.none() | sorted_ints(n_q - 1))
        d = [0] * (n_q - 1) if delays is None else delays
        return CoarseFirstPattern(n_q, delays), (lambda t: ref_coarse_first(n_q, d, t))
    group_by = draw(st.integers(1, 3))
    n_q = group_by * draw(st.integers(1, 3))
    return MusicLMPattern(n_q, group_by), (lambda t: ref_musiclm(n_q, group_by, t))


@st.composite
def custom_layouts(draw):
    """Random valid layouts, including codes repeated over several steps and skipped codes."""
    n_q = draw(st.integers(1, 4))
    timesteps = draw(st.integers(0, 6))
    n_steps = draw(st.integers(1, 12))
    layout = [[] for _ in range(n_steps)]
    for q in range(n_q):
        t = 0
        for s in range(n_steps):
            if draw(st.booleans()):
                t += draw(st.integers(0, 2))  # 0: the same code again at a later step
                layout[s].append(LayoutCoord(t, q))
    for coords in layout:
        coords[:] = draw(st.permutations(coords))
    return Pattern(layout, timesteps=timesteps, n_q=n_q)


# --------------------------------------------------------------------------- known values


def test_delayed_pattern_of_three_codebooks_and_four_frames():
    pattern = DelayedPatternProvider(n_q=3).get_pattern(4)
    assert pattern.num_steps == 7 and pattern.num_sequence_steps == 6
    assert pattern.max_delay == 2 and len(pattern.valid_layout) == 5 == pattern.num_valid_steps
    z = torch.tensor([[1, 2, 3, 4]] * 3).unsqueeze(0)
    values, indexes, mask = pattern.build_pattern_sequence(z, special_token=0)
    assert values.tolist() == [[[0, 1, 2, 3, 4, 0, 0], [0, 0, 1, 2, 3, 4, 0], [0, 0, 0, 1, 2, 3, 4]]]
    assert indexes.shape == mask.shape == (3, 7)
    assert mask.tolist() == (values[0] != 0).tolist()
    back, _, back_mask = pattern.revert_pattern_sequence(values, special_token=0)
    assert torch.equal(back, z) and bool(back_mask.all())


def test_delayed_keep_only_valid_steps():
    pattern = DelayedPatternProvider(n_q=3).get_pattern(4)
    z = torch.tensor([[1, 2, 3, 4]] * 3).unsqueeze(0)
    values, _, _ = pattern.build_pattern_sequence(z, 0, keep_only_valid_steps=True)
    assert values.tolist() == [[[0, 1, 2, 3, 4], [0, 0, 1, 2, 3], [0, 0, 0, 1, 2]]]
    back, _, mask = pattern.revert_pattern_sequence(values, -1, keep_only_valid_steps=True)
    assert back.tolist() == [[[1, 2, 3, 4], [1, 2, 3, -1], [1, 2, -1, -1]]]
    assert mask.tolist() == [[True] * 4, [True, True, True, False], [True, True, False, False]]


def test_unrolled_pattern_of_three_codebooks_and_four_frames():
    pattern = UnrolledPatternProvider(n_q=3).get_pattern(4)
    assert pattern.num_steps == 13
    z = torch.tensor([[1, 2, 3, 4]] * 3).unsqueeze(0)
    values, _, _ = pattern.build_pattern_sequence(z, 0)
    assert values.tolist() == [
        [
            [0, 1, 0, 0, 2, 0, 0, 3, 0, 0, 4, 0, 0],
            [0, 0, 1, 0, 0, 2, 0, 0, 3, 0, 0, 4, 0],
            [0, 0, 0, 1, 0, 0, 2, 0, 0, 3, 0, 0, 4],
        ]
    ]


def test_unrolled_partial_flattening_with_delays():
    # Codebooks 1 and 2 in parallel, 3 frames behind codebook 0; worked out by hand.
    pattern = UnrolledPatternProvider(3, flattening=[0, 1, 1], delays=[0, 3, 3]).get_pattern(4)
    c = LayoutCoord
    assert pattern.layout == [
        [], [c(0, 0)], [c(1, 0)], [c(2, 0)], [c(0, 1), c(0, 2)], [c(3, 0)], [c(1, 1), c(1, 2)],
        [c(4, 0)], [c(2, 1), c(2, 2)], [c(5, 0)], [c(3, 1), c(3, 2)], [c(6, 0)],
    ]  # fmt: skip
    z = torch.tensor([[1, 2, 3, 4]] * 3).unsqueeze(0)
    values, _, _ = pattern.build_pattern_sequence(z, 0)
    assert values[0, 0].tolist() == [0, 1, 2, 3, 0, 4, 0, 0, 0, 0, 0, 0]
    assert values[0, 1].tolist() == values[0, 2].tolist() == [0, 0, 0, 0, 1, 0, 2, 0, 3, 0, 4, 0]


def test_coarse_first_and_musiclm_layouts():
    c = LayoutCoord
    assert CoarseFirstPattern(3).get_pattern(2).layout == [
        [],
        [c(0, 0)],
        [c(1, 0)],
        [c(0, 1), c(0, 2)],
        [c(1, 1), c(1, 2)],
    ]
    assert MusicLMPattern(4, group_by=2).get_pattern(2).layout == [
        [],
        [c(0, 0)],
        [c(0, 1)],
        [c(1, 0)],
        [c(1, 1)],
        [c(0, 2)],
        [c(0, 3)],
        [c(1, 2)],
        [c(1, 3)],
    ]


def test_delayed_without_leading_special_step():
    pattern = DelayedPatternProvider(2, empty_initial=-1).get_pattern(3)
    assert not pattern.starts_with_special_token()
    assert pattern.layout[0] == [LayoutCoord(0, 0)]
    # model outputs are then read from the step that holds the code itself (no shift)
    logits = torch.arange(2 * 2 * pattern.num_steps, dtype=torch.float).view(1, 2, 2, -1)
    out, _, mask = pattern.revert_pattern_logits(logits, float("nan"))
    assert bool(mask.all())
    assert out[0, :, 1, 0].tolist() == logits[0, :, 1, 1].tolist()


def test_step_queries():
    pattern = DelayedPatternProvider(3).get_pattern(4)
    assert pattern.get_steps_with_timestep(1) == [2, 3, 4]
    assert pattern.get_first_step_with_timesteps(1, q=2) == 4
    assert pattern.get_first_step_with_timesteps(9) is None
    assert pattern.get_sequence_coords_with_timestep(0, q=1) == [(2, LayoutCoord(0, 1))]


# --------------------------------------------------------------------------- properties


@PROPERTY
@given(providers(), st.integers(0, 9))
def test_provider_layouts_match_reference(provider_and_ref, timesteps):
    provider, ref = provider_and_ref
    expected = ref(timesteps)
    if not expected:  # no leading special step and nothing to lay out: refused, like audiocraft
        with pytest.raises(ValueError, match="num_steps"):
            provider.get_pattern(timesteps)
        return
    pattern = provider.get_pattern(timesteps)
    assert pattern.layout == expected
    assert pattern.max_delay == ref_max_delay(expected, timesteps)
    assert pattern.valid_layout == expected[: ref_valid_steps(expected, timesteps)]


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY
@given(providers(), st.integers(0, 9), st.integers(0, 3), st.data())
def test_build_then_revert_is_identity(device, provider_and_ref, timesteps, batch, data):
    provider, ref = provider_and_ref
    assume(len(ref(timesteps)) > 0)
    pattern = provider.get_pattern(timesteps)
    t_in = data.draw(st.integers(0, timesteps), label="t_in")
    z = torch.randint(0, 1024, (batch, provider.n_q, t_in), device=device)
    seq, indexes, seq_mask = pattern.build_pattern_sequence(z, special_token=1024)
    assert seq.shape == (batch, provider.n_q, pattern.num_steps) and seq.device == z.device
    assert indexes.device == seq_mask.device == z.device
    # every real code appears, every other cell holds the special token
    assert int(seq_mask.sum()) == provider.n_q * t_in, "each code sits at exactly one step"
    assert bool((seq[:, ~seq_mask] == 1024).all())
    back, _, mask = pattern.revert_pattern_sequence(seq, special_token=-1)
    assert back.shape == (batch, provider.n_q, timesteps)
    assert bool(mask.all()), "every code of every provider is somewhere in the full layout"
    assert torch.equal(back[..., :t_in], z)


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY
@given(providers(), st.integers(0, 9), st.integers(1, 3))
def test_keep_only_valid_steps_round_trip(device, provider_and_ref, timesteps, batch):
    provider, ref = provider_and_ref
    assume(len(ref(timesteps)) > 0)
    pattern = provider.get_pattern(timesteps)
    z = torch.randint(0, 50, (batch, provider.n_q, timesteps), device=device)
    seq, _, _ = pattern.build_pattern_sequence(z, 50, keep_only_valid_steps=True)
    assert seq.shape[-1] == pattern.num_valid_steps
    back, _, mask = pattern.revert_pattern_sequence(seq, -1, keep_only_valid_steps=True)
    assert torch.equal(back[:, mask], z[:, mask])
    assert bool((back[:, ~mask] == -1).all())
    # a code is kept exactly when some valid step holds it
    held = torch.zeros_like(mask)
    for coords in pattern.valid_layout:
        for c in coords:
            if c.t < timesteps:
                held[c.q, c.t] = True
    assert torch.equal(mask, held)


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY
@given(st.one_of(custom_layouts(), providers().map(lambda p: p[0].get_pattern(4))), st.booleans(), st.data())
def test_conversions_match_loop_reference(device, pattern, keep, data):
    layout = pattern.layout
    k, timesteps = pattern.n_q, pattern.timesteps
    t_in = data.draw(st.integers(0, timesteps), label="t_in")
    z = torch.randint(0, 100, (2, k, t_in))
    seq, _, seq_mask = pattern.build_pattern_sequence(z.to(device), -7, keep_only_valid_steps=keep)
    ref_seq, ref_mask = ref_build(layout, z, -7, keep, timesteps)
    assert torch.equal(seq.cpu(), ref_seq) and torch.equal(seq_mask.cpu(), ref_mask)

    # revert a (possibly partly generated) sequence of any length up to the steps in use
    n_steps = pattern.num_valid_steps if keep else pattern.num_steps
    s_len = data.draw(st.integers(0, n_steps), label="s_len")
    s = torch.randint(0, 100, (2, k, s_len))
    back, _, mask = pattern.revert_pattern_sequence(s.to(device), -7, keep_only_valid_steps=keep)
    ref_back, ref_back_mask = ref_revert(layout, s, -7, keep, timesteps)
    assert torch.equal(back.cpu(), ref_back) and torch.equal(mask.cpu(), ref_back_mask)

    logits = torch.randn(2, 3, k, s_len)
    out, _, out_mask = pattern.revert_pattern_logits(logits.to(device), float("nan"), keep_only_valid_steps=keep)
    ref_out, ref_out_mask = ref_revert(layout, logits, float("nan"), keep, timesteps, model_output=True)
    assert torch.equal(out_mask.cpu(), ref_out_mask)
    assert torch.allclose(out.cpu(), ref_out, equal_nan=True)


# --------------------------------------------------------------------------- behaviour details


@pytest.mark.parametrize("device", DEVICES)
def test_logits_training_step_shapes_and_gradients(device):
    """The way a model uses it: build inputs, predict, revert logits, masked cross-entropy."""
    pattern = DelayedPatternProvider(4).get_pattern(10)
    codes = torch.randint(0, 32, (3, 4, 10), device=device)
    seq, _, _ = pattern.build_pattern_sequence(codes, special_token=32, keep_only_valid_steps=True)
    logits = torch.randn(3, 33, 4, seq.shape[-1], device=device, requires_grad=True)
    out, _, mask = pattern.revert_pattern_logits(logits, float("nan"), keep_only_valid_steps=True)
    assert out.shape == (3, 33, 4, 10)
    picked = out.permute(0, 2, 3, 1)[:, mask]  # [B, codes kept, card]
    loss = torch.nn.functional.cross_entropy(picked.reshape(-1, 33), codes[:, mask].reshape(-1))
    # the package docstring's short form: classes stay at dim 1 ([B, card, N] against [B, N])
    short = torch.nn.functional.cross_entropy(out[:, :, mask], codes[:, mask])
    assert torch.allclose(short, loss)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None
    # the prediction for step s + 1 comes from output s: the last output step predicts nothing
    assert bool((logits.grad[..., -1] == 0).all()) and bool((logits.grad[..., :-1] != 0).any())


def test_non_contiguous_input_and_inputs_not_mutated():
    pattern = DelayedPatternProvider(3).get_pattern(5)
    base = torch.randint(0, 9, (2, 5, 3))
    z = base.transpose(1, 2)  # [2, 3, 5], not contiguous
    before = z.clone()
    seq, _, _ = pattern.build_pattern_sequence(z, 9)
    back, _, _ = pattern.revert_pattern_sequence(seq.transpose(1, 2).contiguous().transpose(1, 2), 9)
    assert torch.equal(back, before) and torch.equal(z, before)


def test_special_token_is_never_truncated():
    pattern = ParallelPatternProvider(2).get_pattern(3)
    codes = torch.randint(0, 5, (1, 2, 3))
    seq, _, _ = pattern.build_pattern_sequence(codes, special_token=0.5)
    assert seq.dtype == torch.float32 and seq[0, 0, 0].item() == 0.5
    seq, _, _ = pattern.build_pattern_sequence(codes, special_token=7)
    assert seq.dtype == codes.dtype
    out, _, _ = pattern.revert_pattern_logits(torch.zeros(1, 4, 2, 2), float("nan"))
    assert math.isnan(out[0, 0, 0, 2].item())


@pytest.mark.parametrize(
    ("dtype", "token"), [(torch.uint8, 256), (torch.uint8, -1), (torch.int16, 2**15), (torch.int32, 2**31)]
)
def test_special_token_that_does_not_fit_integer_codes_is_refused(dtype, token):
    """uint8 codes with special_token=-1 would silently become 255, a real code; say so instead."""
    pattern = DelayedPatternProvider(2).get_pattern(3)
    codes = torch.randint(0, 100, (1, 2, 3), dtype=dtype)
    with pytest.raises(ValueError, match=rf"special_token={token} does not fit .*{str(dtype).split('.')[1]}"):
        pattern.build_pattern_sequence(codes, special_token=token)
    with pytest.raises(ValueError, match="special_token"):
        pattern.revert_pattern_sequence(torch.zeros(1, 2, 4, dtype=dtype), special_token=token)
    top = torch.iinfo(dtype).max
    seq, _, _ = pattern.build_pattern_sequence(codes, special_token=top)  # the largest value still fits
    assert seq.dtype == dtype and int(seq[0, 0, 0]) == top


def test_special_token_may_be_a_tensor():
    pattern = DelayedPatternProvider(2).get_pattern(3)
    codes = torch.randint(0, 5, (2, 2, 3))
    expected, _, _ = pattern.build_pattern_sequence(codes, special_token=9)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for token in (torch.tensor(9), torch.tensor([9]), np.int64(9)):
            got, _, _ = pattern.build_pattern_sequence(codes, special_token=token)
            assert torch.equal(got, expected)


def test_tables_are_cached_and_returned_copies_are_safe():
    provider = DelayedPatternProvider(3)
    pattern = provider.get_pattern(6)
    assert provider.get_pattern(6) is pattern
    z = torch.randint(0, 9, (1, 3, 6))
    seq, indexes, mask = pattern.build_pattern_sequence(z, 9)
    mask.fill_(False)
    indexes.fill_(0)
    seq2, _, mask2 = pattern.build_pattern_sequence(z, 9)
    assert torch.equal(seq, seq2) and bool(mask2.any())
    assert len(pattern._sequence_tables) == 1  # one table for this shape, reused


def test_provider_repr_is_its_constructor_call():
    from lightning_utils import patterns

    for provider in (
        DelayedPatternProvider(3, delays=[0, 1, 1]),
        ParallelPatternProvider(2, empty_initial=1),
        UnrolledPatternProvider(3, flattening=[0, 1, 1], delays=[0, 2, 2]),
        CoarseFirstPattern(3),
        MusicLMPattern(4),
    ):
        rebuilt = eval(repr(provider), vars(patterns))  # noqa: S307 - our own repr
        assert type(rebuilt) is type(provider) and repr(rebuilt) == repr(provider)
        assert rebuilt.get_pattern(5).layout == provider.get_pattern(5).layout


def test_pickle_round_trip():
    provider = UnrolledPatternProvider(3, flattening=[0, 1, 1], delays=[0, 2, 2])
    pattern = provider.get_pattern(5)
    z = torch.randint(0, 9, (2, 3, 5))
    seq, _, _ = pattern.build_pattern_sequence(z, 9)
    provider2 = pickle.loads(pickle.dumps(provider))
    pattern2 = pickle.loads(pickle.dumps(pattern))
    assert torch.equal(provider2.get_pattern(5).build_pattern_sequence(z, 9)[0], seq)
    assert torch.equal(pattern2.build_pattern_sequence(z, 9)[0], seq)
    assert pattern2.layout == pattern.layout


def test_uncached_provider_and_custom_subclass():
    class Reversed(CodebooksPatternProvider):
        """Codebooks of a frame from last to first, one per step."""

        def make_pattern(self, timesteps):
            layout = [[]] + [[LayoutCoord(t, q)] for t in range(timesteps) for q in reversed(range(self.n_q))]
            return Pattern(layout, timesteps, self.n_q)

    provider = Reversed(2, cached=False)
    assert provider.get_pattern(3) is not provider.get_pattern(3)
    z = torch.tensor([[[1, 2, 3], [4, 5, 6]]])
    seq, _, _ = provider.get_pattern(3).build_pattern_sequence(z, 0)
    assert seq.tolist() == [[[0, 0, 1, 0, 2, 0, 3], [0, 4, 0, 5, 0, 6, 0]]]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: DelayedPatternProvider(3, delays=[0, 2, 1]), "delays"),
        (lambda: DelayedPatternProvider(3, delays=[0, 1]), "delays"),
        (lambda: DelayedPatternProvider(2, delays=[-1, 0]), "delays"),
        (lambda: DelayedPatternProvider(2, delays=[0, 1.5]), "delays"),
        (lambda: DelayedPatternProvider(2, delays="01"), "delays"),
        (lambda: DelayedPatternProvider(2, flatten_first=-1), "flatten_first"),
        (lambda: DelayedPatternProvider(0), "n_q"),
        (lambda: DelayedPatternProvider(True), "n_q"),
        (lambda: ParallelPatternProvider(-2), "n_q"),
        (lambda: UnrolledPatternProvider(3, flattening=[1, 0, 2]), "flattening"),
        (lambda: UnrolledPatternProvider(3, flattening=[0, 1]), "flattening"),
        (lambda: UnrolledPatternProvider(3, delays=[2, 1, 0]), "delays"),
        (lambda: UnrolledPatternProvider(3, flattening=[0, 1, 1], delays=[0, 1, 2]), "delays"),
        (lambda: CoarseFirstPattern(1), "n_q"),
        (lambda: CoarseFirstPattern(3, delays=[0, 1, 2]), "delays"),
        (lambda: MusicLMPattern(3, group_by=2), "group_by"),
        (lambda: MusicLMPattern(4, group_by=0), "group_by"),
        (lambda: DelayedPatternProvider(2).get_pattern(-1), "timesteps"),
        (lambda: UnrolledPatternProvider(2).num_virtual_steps(-1), "timesteps"),
        (lambda: Pattern([[]], timesteps=-1, n_q=1), "timesteps"),
        (lambda: ParallelPatternProvider(2, empty_initial=-1).get_pattern(0), "num_steps"),
        (lambda: Pattern([], timesteps=2, n_q=1), "layout"),
        (lambda: Pattern([[LayoutCoord(1, 0)], [LayoutCoord(0, 0)]], timesteps=2, n_q=1), "layout"),
        (lambda: Pattern([[LayoutCoord(0, 0), LayoutCoord(1, 0)]], timesteps=2, n_q=1), "layout"),
        (lambda: Pattern([[LayoutCoord(0, 1)]], timesteps=2, n_q=1), "layout"),
        (lambda: Pattern([[LayoutCoord(-1, 0)]], timesteps=2, n_q=1), "layout"),
        (lambda: Pattern([[7]], timesteps=2, n_q=1), "layout"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda p: p.build_pattern_sequence(torch.zeros(3, 4, dtype=torch.long), 0), "z"),
        (lambda p: p.build_pattern_sequence(torch.zeros(1, 2, 4, dtype=torch.long), 0), "z"),
        (lambda p: p.build_pattern_sequence(torch.zeros(1, 3, 5, dtype=torch.long), 0), "z"),
        (lambda p: p.build_pattern_sequence([[[1]]], 0), "z"),
        (lambda p: p.revert_pattern_sequence(torch.zeros(1, 3, 8, dtype=torch.long), 0), "s"),
        (lambda p: p.revert_pattern_sequence(torch.zeros(1, 3, 6), 0, keep_only_valid_steps=True), "s"),
        (lambda p: p.revert_pattern_sequence(torch.zeros(1, 4, 6), 0), "s"),
        (lambda p: p.revert_pattern_logits(torch.zeros(1, 3, 7), 0.0), "logits"),
        (lambda p: p.revert_pattern_logits(torch.zeros(1, 5, 2, 7), 0.0), "logits"),
        (lambda p: p.revert_pattern_logits(torch.zeros(1, 5, 3, 8), 0.0), "logits"),
    ],
)
def test_bad_shapes_raise_value_error_naming_the_argument(call, name):
    pattern = DelayedPatternProvider(3).get_pattern(4)  # 7 steps, 5 valid
    with pytest.raises(ValueError, match=rf"^{name} "):
        call(pattern)


def test_providers_are_chosen_by_class_path_in_a_config():
    """A LightningModule argument typed as a provider takes any provider from a YAML class path."""
    jsonargparse = pytest.importorskip("jsonargparse", reason="class paths are parsed by jsonargparse (cli extra)")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--pattern", type=CodebooksPatternProvider)
    value = {
        "class_path": "lightning_utils.patterns.UnrolledPatternProvider",
        "init_args": {"n_q": 3, "flattening": [0, 1, 1], "delays": [0, 2, 2]},
    }
    config = parser.parse_args([f"--pattern={json.dumps(value)}"])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    provider = instantiate(config).pattern
    assert isinstance(provider, UnrolledPatternProvider)
    assert provider.flattening == [0, 1, 1] and provider.delays == [0, 2, 2]
