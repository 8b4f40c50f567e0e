"""lightning_utils.patterns as a drop-in for audiocraft's ``codebooks_patterns`` module.

The tables below are audiocraft's public API (its ``Pattern`` dataclass, the provider classes,
their signatures and defaults) and the behaviour its documentation and its own tests state;
every expected value here was worked out by hand from those semantics. A name or default that
drifts, or a result that differs, fails here.
"""

from __future__ import annotations

import inspect
import pickle

import pytest
import torch

from lightning_utils.patterns import (
    CoarseFirstPattern,
    CodebooksPatternProvider,
    DelayedPatternProvider,
    LayoutCoord,
    MusicLMPattern,
    ParallelPatternProvider,
    Pattern,
    PatternError,
    UnrolledPatternProvider,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
c = LayoutCoord
_ = inspect.Parameter.empty  # "no default"

# --------------------------------------------------------------------------- the API surface
# (class, method or constructor, [(parameter, default), ...]) with audiocraft's names, order and
# defaults; ``self`` left out. Our signatures may only add parameters with defaults at the end.
SIGNATURES = [
    (Pattern, "__init__", [("layout", _), ("timesteps", _), ("n_q", _)]),
    (Pattern, "starts_with_special_token", []),
    (Pattern, "get_sequence_coords_with_timestep", [("t", _), ("q", None)]),
    (Pattern, "get_steps_with_timestep", [("t", _), ("q", None)]),
    (Pattern, "get_first_step_with_timesteps", [("t", _), ("q", None)]),
    (
        Pattern,
        "_build_pattern_sequence_scatter_indexes",
        [("timesteps", _), ("n_q", _), ("keep_only_valid_steps", _), ("device", "cpu")],
    ),
    (Pattern, "build_pattern_sequence", [("z", _), ("special_token", _), ("keep_only_valid_steps", False)]),
    (
        Pattern,
        "_build_reverted_sequence_scatter_indexes",
        [
            ("sequence_steps", _),
            ("n_q", _),
            ("keep_only_valid_steps", False),
            ("is_model_output", False),
            ("device", "cpu"),
        ],
    ),
    (Pattern, "revert_pattern_sequence", [("s", _), ("special_token", _), ("keep_only_valid_steps", False)]),
    (Pattern, "revert_pattern_logits", [("logits", _), ("special_token", _), ("keep_only_valid_steps", False)]),
    (CodebooksPatternProvider, "__init__", [("n_q", _), ("cached", True)]),
    (CodebooksPatternProvider, "get_pattern", [("timesteps", _)]),
    (
        DelayedPatternProvider,
        "__init__",
        [("n_q", _), ("delays", None), ("flatten_first", 0), ("empty_initial", 0)],
    ),
    (DelayedPatternProvider, "get_pattern", [("timesteps", _)]),
    (ParallelPatternProvider, "__init__", [("n_q", _), ("empty_initial", 0)]),
    (ParallelPatternProvider, "get_pattern", [("timesteps", _)]),
    (UnrolledPatternProvider, "__init__", [("n_q", _), ("flattening", None), ("delays", None)]),
    (UnrolledPatternProvider, "get_pattern", [("timesteps", _)]),
    (UnrolledPatternProvider, "num_virtual_steps", [("timesteps", _)]),
    (CoarseFirstPattern, "__init__", [("n_q", _), ("delays", None)]),
    (CoarseFirstPattern, "get_pattern", [("timesteps", _)]),
    (MusicLMPattern, "__init__", [("n_q", _), ("group_by", 2)]),
    (MusicLMPattern, "get_pattern", [("timesteps", _)]),
]


@pytest.mark.parametrize(("cls", "name", "expected"), SIGNATURES, ids=lambda x: getattr(x, "__name__", None))
def test_signature_matches_audiocraft(cls, name, expected):
    params = list(inspect.signature(getattr(cls, name)).parameters.values())
    assert params[0].name == "self"
    params = params[1:]
    got = [(p.name, p.default) for p in params[: len(expected)]]
    assert got == expected
    for p in params:
        assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY), f"{name}({p.name}) must be callable by name"
    for p in params[len(expected) :]:
        assert p.default is not p.empty, f"extra parameter {p.name} of {name} must have a default"


@pytest.mark.parametrize("name", ["num_sequence_steps", "max_delay", "valid_layout"])
def test_pattern_properties_are_properties(name):
    assert isinstance(inspect.getattr_static(Pattern, name), property)


def test_pattern_fields_and_provider_attributes():
    pattern = Pattern([[], [c(0, 0)], [c(1, 0)]], timesteps=2, n_q=1)
    assert pattern.layout == [[], [(0, 0)], [(1, 0)]] and pattern.timesteps == 2 and pattern.n_q == 1
    assert isinstance(pattern.layout[1][0], LayoutCoord) and pattern.layout[1][0]._fields == ("t", "q")

    delayed = DelayedPatternProvider(3)
    assert (delayed.n_q, delayed.delays, delayed.flatten_first, delayed.empty_initial) == (3, [0, 1, 2], 0, 0)
    parallel = ParallelPatternProvider(2)
    assert (parallel.n_q, parallel.delays, parallel.flatten_first, parallel.empty_initial) == (2, [0, 0], 0, 0)
    assert isinstance(parallel, DelayedPatternProvider)
    unrolled = UnrolledPatternProvider(3, flattening=[0, 1, 1], delays=[0, 2, 2])
    assert unrolled.n_q == 3 and unrolled.max_delay == 2 and UnrolledPatternProvider(3).max_delay == 0
    assert UnrolledPatternProvider.FlattenedCodebook._fields == ("codebooks", "delay")
    coarse = CoarseFirstPattern(3)
    assert coarse.n_q == 3 and coarse.delays == [0, 0]
    musiclm = MusicLMPattern(4)
    assert musiclm.n_q == 4 and musiclm.group_by == 2
    for provider in (delayed, parallel, unrolled, coarse, musiclm):
        assert isinstance(provider, CodebooksPatternProvider)


def test_provider_base_is_abstract():
    with pytest.raises(TypeError):
        CodebooksPatternProvider(2)  # type: ignore[abstract]

    class Nothing(CodebooksPatternProvider):
        pass

    with pytest.raises(TypeError):
        Nothing(2)  # type: ignore[abstract]


# --------------------------------------------------------------------------- layouts (audiocraft's tests)


@pytest.mark.parametrize("n_q", [1, 4, 8])
@pytest.mark.parametrize("timesteps", [0, 1, 16])
def test_parallel_layout_length_and_content(n_q, timesteps):
    pattern = ParallelPatternProvider(n_q).get_pattern(timesteps)
    assert len(pattern.layout) == timesteps + 1  # the leading special step, then one per frame
    for s, coords in enumerate(pattern.layout):
        assert [(code.t, code.q) for code in coords] == ([] if s == 0 else [(s - 1, q) for q in range(n_q)])
    assert pattern.max_delay == 0
    assert len(pattern.valid_layout) == len(pattern.layout) - pattern.max_delay


@pytest.mark.parametrize("n_q", [1, 4, 8])
@pytest.mark.parametrize("timesteps", [0, 1, 16])
def test_delayed_layout_length(n_q, timesteps):
    for delays in (list(range(n_q)), [0] + [1] * (n_q - 1), [0] + [4] * (n_q - 1)):
        pattern = DelayedPatternProvider(n_q, delays).get_pattern(timesteps)
        assert len(pattern.layout) == timesteps + max(delays) + 1


@pytest.mark.parametrize("n_q", [1, 4, 8])
@pytest.mark.parametrize("timesteps", [8, 16])
def test_delayed_default_content(n_q, timesteps):
    """Default delays 0..K-1: step s holds codebooks 0..min(s-1, K-1), codebook q at frame s - q - 1."""
    pattern = DelayedPatternProvider(n_q).get_pattern(timesteps)
    for s, coords in enumerate(pattern.layout):
        assert [code.q for code in coords] == list(range(min(s, n_q)))
        assert all(code.t == max(0, s - code.q - 1) for code in coords)


@pytest.mark.parametrize("timesteps", [0, 8, 16])
@pytest.mark.parametrize("delays", [[0, 1, 2, 3], [0, 1, 1, 1], [0, 3, 3, 3], [0, 3]])
def test_delayed_max_delay(timesteps, delays):
    pattern = DelayedPatternProvider(len(delays), delays).get_pattern(timesteps)
    assert pattern.max_delay == max(delays)
    assert len(pattern.valid_layout) == len(pattern.layout) - pattern.max_delay


@pytest.mark.parametrize("timesteps", [0, 1, 16])
@pytest.mark.parametrize("flattening", [[0, 1, 2], [0, 1, 1]])
@pytest.mark.parametrize("delays", [[0, 0, 0], [0, 5, 5]])
def test_unrolled_layout_length_and_max_delay(timesteps, flattening, delays):
    provider = UnrolledPatternProvider(len(flattening), flattening, delays)
    pattern = provider.get_pattern(timesteps)
    assert len(pattern.layout) == provider.num_virtual_steps(timesteps) + max(delays)
    assert pattern.max_delay == max(delays)


def test_num_virtual_steps():
    """One step per inner step of each frame, plus the leading special step."""
    assert UnrolledPatternProvider(3).num_virtual_steps(4) == 13
    assert UnrolledPatternProvider(3).num_virtual_steps(0) == 1
    assert UnrolledPatternProvider(3, flattening=[0, 1, 1]).num_virtual_steps(4) == 9
    assert UnrolledPatternProvider(4, flattening=[0, 0, 2, 2]).num_virtual_steps(5) == 16  # inner step 1 stays empty
    assert UnrolledPatternProvider(2, flattening=[0, 0]).num_virtual_steps(7) == 8


# --------------------------------------------------------------------------- timesteps=0


def test_zero_timesteps_layouts():
    assert ParallelPatternProvider(2).get_pattern(0).layout == [[]]
    # Delayed: codebook 0 runs max(delays) frames past the (empty) end.
    assert DelayedPatternProvider(3).get_pattern(0).layout == [[], [c(0, 0)], [c(1, 0), c(0, 1)]]
    assert UnrolledPatternProvider(3).get_pattern(0).layout == [[]]
    assert UnrolledPatternProvider(3, [0, 1, 1], [0, 2, 2]).get_pattern(0).layout == [[], [c(0, 0)], [c(1, 0)]]
    assert CoarseFirstPattern(3).get_pattern(0).layout == [[]]
    assert CoarseFirstPattern(3, delays=[0, 2]).get_pattern(0).layout == [[], [c(0, 1)], [c(1, 1)]]
    assert MusicLMPattern(4).get_pattern(0).layout == [[]]
    pattern = Pattern([[]], timesteps=0, n_q=2)
    assert pattern.num_sequence_steps == 0 and pattern.max_delay == 0 and pattern.valid_layout == [[]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "provider",
    [
        ParallelPatternProvider(2),
        DelayedPatternProvider(2),
        UnrolledPatternProvider(2, delays=[0, 3]),
        CoarseFirstPattern(2, delays=[1]),
        MusicLMPattern(2),
    ],
    ids=repr,
)
def test_zero_timesteps_conversions(device, provider):
    pattern = provider.get_pattern(0)
    z = torch.zeros(3, 2, 0, dtype=torch.long, device=device)
    seq, indexes, mask = pattern.build_pattern_sequence(z, special_token=9)
    assert seq.shape == (3, 2, len(pattern.layout)) and bool((seq == 9).all()) and not bool(mask.any())
    assert indexes.shape == mask.shape == (2, len(pattern.layout)) and bool((indexes == 0).all())
    back, indexes, mask = pattern.revert_pattern_sequence(seq, special_token=-1)
    assert back.shape == (3, 2, 0) and indexes.shape == mask.shape == (2, 0)
    out, _, mask = pattern.revert_pattern_logits(torch.randn(3, 5, 2, len(pattern.layout), device=device), 0.0)
    assert out.shape == (3, 5, 2, 0) and mask.shape == (2, 0)


# --------------------------------------------------------------------------- worked examples


def test_delayed_docstring_example_valid_steps():
    """audiocraft's DelayedPatternProvider example: T=4, K=3, the sequence up to the valid steps."""
    pattern = DelayedPatternProvider(3).get_pattern(4)
    z = torch.tensor([[1, 2, 3, 4]] * 3).unsqueeze(0)
    seq, _, _ = pattern.build_pattern_sequence(z, special_token=0, keep_only_valid_steps=True)
    assert seq[0].tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3], [0, 0, 0, 1, 2]]


def test_unrolled_partial_flattening_example():
    """flattening=[0, 1, 1]: codebook 0 alone, then codebooks 1 and 2 together, frame by frame."""
    pattern = UnrolledPatternProvider(3, flattening=[0, 1, 1]).get_pattern(4)
    z = torch.tensor([[1, 2, 3, 4]] * 3).unsqueeze(0)
    seq, _, _ = pattern.build_pattern_sequence(z, special_token=0)
    assert seq[0].tolist() == [
        [0, 1, 0, 2, 0, 3, 0, 4, 0],
        [0, 0, 1, 0, 2, 0, 3, 0, 4],
        [0, 0, 1, 0, 2, 0, 3, 0, 4],
    ]


def test_delayed_empty_initial():
    """empty_initial=N adds N empty steps after the leading one; a negative value drops the leading step."""
    assert DelayedPatternProvider(2, empty_initial=2).get_pattern(2).layout == [
        [], [], [], [c(0, 0)], [c(1, 0), c(0, 1)], [c(2, 0), c(1, 1)],
    ]  # fmt: skip
    pattern = ParallelPatternProvider(2, empty_initial=-1).get_pattern(2)
    assert pattern.layout == [[c(0, 0), c(0, 1)], [c(1, 0), c(1, 1)]] and not pattern.starts_with_special_token()
    assert DelayedPatternProvider(2).get_pattern(2).starts_with_special_token()


def test_delayed_flatten_first():
    assert DelayedPatternProvider(2, flatten_first=1).get_pattern(3).layout == [
        [], [c(0, 0)], [c(0, 1)], [c(1, 0)], [c(2, 0), c(1, 1)], [c(3, 0), c(2, 1)],
    ]  # fmt: skip


def test_valid_layout_is_the_layout_less_max_delay_steps():
    """``valid_layout`` is ``layout[:len(layout) - max_delay]``, Python slicing included."""
    delayed = DelayedPatternProvider(2).get_pattern(3)  # codebook 0 reaches frame 3: max_delay 1
    assert delayed.max_delay == 1 and delayed.valid_layout == delayed.layout[:-1]
    short = Pattern([[], [c(0, 0)]], timesteps=3, n_q=1)  # reaches only frame 0: max_delay -2
    assert short.max_delay == -2 and short.valid_layout == short.layout
    # reaching 4 frames past the end with 3 steps: the slice stops 1 step before the end
    far = Pattern([[], [c(0, 0)], [c(5, 0)]], timesteps=2, n_q=1)
    assert far.max_delay == 4 and far.valid_layout == [[], [c(0, 0)]]
    seq, _, mask = far.build_pattern_sequence(torch.tensor([[[7, 8]]]), 0, keep_only_valid_steps=True)
    assert seq.tolist() == [[[0, 7]]] and mask.tolist() == [[False, True]]
    # layout[0] is not counted in max_delay (it is the special step of every audiocraft pattern)
    assert Pattern([[c(4, 0)], [c(4, 0)]], timesteps=5, n_q=1).max_delay == 0


def test_step_queries():
    pattern = DelayedPatternProvider(3).get_pattern(4)
    assert pattern.get_sequence_coords_with_timestep(1) == [(2, c(1, 0)), (3, c(1, 1)), (4, c(1, 2))]
    assert pattern.get_sequence_coords_with_timestep(1, q=1) == [(3, c(1, 1))]
    assert pattern.get_steps_with_timestep(4) == [5, 6]  # frame 4 is past the end: codebooks 0 and 1 run on
    assert pattern.get_steps_with_timestep(0, 2) == [3]
    assert pattern.get_first_step_with_timesteps(2) == 3
    assert pattern.get_first_step_with_timesteps(0, q=2) == 3
    repeated = Pattern([[], [c(0, 0)], [c(0, 0)], [c(1, 0)]], timesteps=2, n_q=1)
    assert repeated.get_steps_with_timestep(0) == [1, 2] and repeated.get_first_step_with_timesteps(1) == 3


# --------------------------------------------------------------------------- scatter index helpers


@pytest.mark.parametrize("device", DEVICES)
def test_build_pattern_sequence_scatter_indexes(device):
    # K=2, T=3, delays [0, 1]: [[], [(0,0)], [(1,0),(0,1)], [(2,0),(1,1)], [(3,0),(2,1)]];
    # indexes point into z flattened to [K * T]; K * T = 6 is the special token.
    pattern = DelayedPatternProvider(2).get_pattern(3)
    indexes, mask = pattern._build_pattern_sequence_scatter_indexes(3, 2, False, device=device)
    assert indexes.device.type == mask.device.type == device
    assert indexes.dtype == torch.long and mask.dtype == torch.bool
    assert indexes.tolist() == [[6, 0, 1, 2, 6], [6, 6, 3, 4, 5]]
    assert mask.tolist() == [[False, True, True, True, False], [False, False, True, True, True]]
    indexes, mask = pattern._build_pattern_sequence_scatter_indexes(3, 2, keep_only_valid_steps=True)
    assert indexes.tolist() == [[6, 0, 1, 2], [6, 6, 3, 4]]
    indexes, mask = pattern._build_pattern_sequence_scatter_indexes(2, 2, False, torch.device(device))
    assert indexes.tolist() == [[4, 0, 1, 4, 4], [4, 4, 2, 3, 4]]  # a shorter input: sentinel K * 2
    assert mask.tolist() == [[False, True, True, False, False], [False, False, True, True, False]]


@pytest.mark.parametrize("device", DEVICES)
def test_build_reverted_sequence_scatter_indexes(device):
    # same pattern; indexes point into the sequence flattened to [K * S]; K * S is the special token
    pattern = DelayedPatternProvider(2).get_pattern(3)
    indexes, mask = pattern._build_reverted_sequence_scatter_indexes(5, 2, device=device)
    assert indexes.device.type == mask.device.type == device
    assert indexes.tolist() == [[1, 2, 3], [7, 8, 9]] and bool(mask.all())
    # model output s predicts step s + 1
    indexes, mask = pattern._build_reverted_sequence_scatter_indexes(5, 2, is_model_output=True)
    assert indexes.tolist() == [[0, 1, 2], [6, 7, 8]]
    indexes, mask = pattern._build_reverted_sequence_scatter_indexes(3, 2, False, True)
    assert indexes.tolist() == [[0, 1, 2], [4, 5, 6]] and mask.tolist() == [[True] * 3, [True, True, False]]
    indexes, mask = pattern._build_reverted_sequence_scatter_indexes(4, 2, keep_only_valid_steps=True)
    assert indexes.tolist() == [[1, 2, 3], [6, 7, 8]] and mask.tolist() == [[True] * 3, [True, True, False]]


def test_scatter_index_helpers_agree_with_conversions():
    pattern = UnrolledPatternProvider(3, [0, 1, 1], [0, 2, 2]).get_pattern(5)
    z = torch.randint(0, 9, (2, 3, 5))
    seq, indexes, mask = pattern.build_pattern_sequence(z, 9, keep_only_valid_steps=True)
    i2, m2 = pattern._build_pattern_sequence_scatter_indexes(5, 3, True)
    assert torch.equal(indexes, i2) and torch.equal(mask, m2)
    _, indexes, mask = pattern.revert_pattern_logits(torch.randn(2, 4, 3, seq.shape[-1]), 0.0, True)
    i2, m2 = pattern._build_reverted_sequence_scatter_indexes(seq.shape[-1], 3, True, is_model_output=True)
    assert torch.equal(indexes, i2) and torch.equal(mask, m2)


# --------------------------------------------------------------------------- conversions vs references
# audiocraft tests its scatter conversions against plain loops over the layout; these are the
# same definitions, written out.


def loop_build(z, pattern, special):
    b, k, t_in = z.shape
    out = torch.full((b, k, len(pattern.layout)), special, dtype=torch.long)
    for s, coords in enumerate(pattern.layout):
        for t, q in coords:
            if t < t_in:
                out[:, q, s] = z[:, q, t]
    return out


def loop_revert(seq, pattern, special):
    out = torch.full((*seq.shape[:2], pattern.timesteps), special, dtype=seq.dtype)
    for s, coords in enumerate(pattern.layout):
        for t, q in coords:
            if t < pattern.timesteps:
                out[:, q, t] = seq[:, q, s]
    return out


def loop_revert_logits(logits, pattern, special):
    out = torch.full((*logits.shape[:3], pattern.timesteps), special, dtype=logits.dtype)
    for s, coords in enumerate(pattern.layout[1:]):  # output s predicts step s + 1
        if s < logits.shape[-1]:
            for t, q in coords:
                if t < pattern.timesteps:
                    out[:, :, q, t] = logits[:, :, q, s]
    return out


def audiocraft_test_providers(n_q):
    return [
        ParallelPatternProvider(n_q),
        DelayedPatternProvider(n_q, list(range(n_q))),
        DelayedPatternProvider(n_q, [0] + [1] * (n_q - 1)),
        UnrolledPatternProvider(n_q, flattening=list(range(n_q)), delays=[0] * n_q),
        UnrolledPatternProvider(n_q, flattening=[0] + [1] * (n_q - 1), delays=[0] * n_q),
        UnrolledPatternProvider(n_q, flattening=[0] + [1] * (n_q - 1), delays=[0] + [5] * (n_q - 1)),
    ]


@pytest.mark.parametrize("n_q", [1, 4])
@pytest.mark.parametrize("timesteps", [1, 16])
def test_conversions_match_loops(n_q, timesteps):
    card = 8
    for provider in audiocraft_test_providers(n_q):
        pattern = provider.get_pattern(timesteps)
        z = torch.randint(0, card, (2, n_q, timesteps))
        seq, _, _ = pattern.build_pattern_sequence(z, card)
        assert torch.equal(seq, loop_build(z, pattern, card))
        back, _, _ = pattern.revert_pattern_sequence(seq, card)
        assert torch.equal(back, loop_revert(seq, pattern, card)) and torch.equal(back, z)
        logits = torch.randn(2, card, n_q, seq.shape[-1])
        out, _, _ = pattern.revert_pattern_logits(logits, float("nan"))
        assert torch.allclose(out, loop_revert_logits(logits, pattern, float("nan")), equal_nan=True)


def test_bad_inputs_raise_assertion_error_too():
    """audiocraft asserts; our errors are ValueErrors that are also AssertionErrors."""
    pattern = DelayedPatternProvider(4).get_pattern(16)
    assert issubclass(PatternError, ValueError) and issubclass(PatternError, AssertionError)
    for bad_t in (17, pattern.num_sequence_steps):
        with pytest.raises(AssertionError):
            pattern.build_pattern_sequence(torch.zeros(2, 4, bad_t, dtype=torch.long), 0)
    for bad_q in (0, 3, 5):
        with pytest.raises(AssertionError):
            pattern.build_pattern_sequence(torch.zeros(2, bad_q, 16, dtype=torch.long), 0)
    with pytest.raises(AssertionError):
        pattern.revert_pattern_sequence(torch.zeros(2, 4, len(pattern.layout) + 1, dtype=torch.long), 0)
    with pytest.raises(AssertionError, match="n_q"):
        pattern._build_pattern_sequence_scatter_indexes(16, 3, False)
    with pytest.raises(AssertionError, match="timesteps"):
        pattern._build_pattern_sequence_scatter_indexes(17, 4, False)
    with pytest.raises(AssertionError, match="sequence_steps"):
        pattern._build_reverted_sequence_scatter_indexes(len(pattern.valid_layout) + 1, 4, True)
    for make in (
        lambda: DelayedPatternProvider(0),
        lambda: DelayedPatternProvider(3, delays=[0, 1]),
        lambda: DelayedPatternProvider(3, delays=[2, 1, 0]),
        lambda: UnrolledPatternProvider(3, flattening=[0, 1, 1], delays=[0, 1, 2]),
        lambda: CoarseFirstPattern(3, delays=[0]),
        lambda: Pattern([], timesteps=1, n_q=1),
        lambda: Pattern([[], [c(1, 0)], [c(0, 0)]], timesteps=2, n_q=1),
        lambda: Pattern([[], [c(0, 0), c(1, 0)]], timesteps=2, n_q=1),
    ):
        with pytest.raises(AssertionError):
            make()


# --------------------------------------------------------------------------- providers as audiocraft uses them


def test_get_pattern_is_cached():
    provider = DelayedPatternProvider(3)
    assert provider.get_pattern(5) is provider.get_pattern(5)
    assert provider.get_pattern(5) is not provider.get_pattern(6)


def test_audiocraft_style_subclass_overriding_get_pattern():
    """audiocraft's extension point: a subclass writes ``get_pattern`` (not our ``make_pattern``)."""
    calls = []

    class Reversed(CodebooksPatternProvider):
        def __init__(self, n_q: int):
            super().__init__(n_q)

        def get_pattern(self, timesteps: int) -> Pattern:
            calls.append(timesteps)
            layout = [[]] + [[c(t, q)] for t in range(timesteps) for q in reversed(range(self.n_q))]
            return Pattern(layout, n_q=self.n_q, timesteps=timesteps)

    provider = Reversed(2)
    pattern = provider.get_pattern(3)
    assert provider.get_pattern(3) is pattern and calls == [3]  # cached like every provider
    assert provider.get_pattern(timesteps=0).layout == [[]]
    z = torch.tensor([[[1, 2, 3], [4, 5, 6]]])
    assert pattern.build_pattern_sequence(z, 0)[0].tolist() == [[[0, 0, 1, 0, 2, 0, 3], [0, 4, 0, 5, 0, 6, 0]]]
    assert pickle.loads(pickle.dumps(pattern)) == pattern

    class EveryOther(DelayedPatternProvider):
        """Builds on the parent's pattern, keeping every codebook's coordinates."""

        def get_pattern(self, timesteps: int) -> Pattern:
            base = super().get_pattern(timesteps)
            return Pattern(base.layout + [[]], n_q=self.n_q, timesteps=timesteps)

    sub = EveryOther(2)
    assert sub.get_pattern(4) is sub.get_pattern(4)
    assert sub.get_pattern(4).layout == DelayedPatternProvider(2).get_pattern(4).layout + [[]]


def test_pattern_equality_is_by_value():
    """audiocraft's Pattern is a dataclass: equal when layout, timesteps and n_q are."""
    made = DelayedPatternProvider(2).get_pattern(2)
    written = Pattern([[], [c(0, 0)], [c(1, 0), c(0, 1)], [c(2, 0), c(1, 1)]], timesteps=2, n_q=2)
    assert made == written
    assert not made.__ne__(written)
    assert made != Pattern(written.layout, timesteps=3, n_q=2)
    assert made != Pattern(written.layout, timesteps=2, n_q=3)
    assert made != Pattern(written.layout[:-1], timesteps=2, n_q=2)
    assert made != written.layout
    assert Pattern([[], [c(0, 0), c(0, 1)]], 1, 2) != Pattern([[], [c(0, 1), c(0, 0)]], 1, 2)  # order within a step


@pytest.mark.parametrize(
    "provider",
    [DelayedPatternProvider(3), UnrolledPatternProvider(3, [0, 1, 1], [0, 2, 2]), ParallelPatternProvider(3)],
    ids=repr,
)
def test_generation_loop_as_musicgen_runs_it(provider):
    """The sampling loop of audiocraft's LM: build with unknown codes, start at the first step
    holding the first new frame, fill step by step, then revert to codes."""
    timesteps, prompt_len, special, unknown = 6, 2, 100, -1
    codes = torch.randint(0, 50, (2, 3, timesteps))
    pattern = provider.get_pattern(timesteps)
    target, _, _ = pattern.build_pattern_sequence(codes, special)
    gen_codes = torch.full_like(codes, unknown)
    gen_codes[..., :prompt_len] = codes[..., :prompt_len]
    gen_sequence, _, mask = pattern.build_pattern_sequence(gen_codes, special)
    start = pattern.get_first_step_with_timesteps(prompt_len)
    assert start is not None
    assert not bool((gen_sequence[..., :start] == unknown).any())  # everything before it is the prompt
    for offset in range(start, gen_sequence.shape[-1]):
        next_token = target[..., offset : offset + 1].clone()  # a perfect "model"
        next_token[~mask[..., offset : offset + 1].expand(2, -1, -1)] = special
        step = gen_sequence[..., offset : offset + 1]
        gen_sequence[..., offset : offset + 1] = torch.where(step == unknown, next_token, step)
    assert not bool((gen_sequence == unknown).any())
    out_codes, _, out_mask = pattern.revert_pattern_sequence(gen_sequence, special_token=unknown)
    assert torch.equal(out_codes, codes) and bool(out_mask.all())


def test_subclass_get_pattern_calling_the_abstract_base_is_refused():
    """audiocraft's base get_pattern is abstract (NotImplementedError); ours must not recurse."""

    class CallsBase(CodebooksPatternProvider):
        def get_pattern(self, timesteps: int) -> Pattern:
            return super().get_pattern(timesteps)

    with pytest.raises(NotImplementedError, match="CallsBase.get_pattern"):
        CallsBase(2).get_pattern(3)


def test_subclass_get_pattern_uncached_when_asked():
    class Flat(CodebooksPatternProvider):
        def get_pattern(self, timesteps: int) -> Pattern:
            return Pattern([[]] + [[c(t, q)] for t in range(timesteps) for q in range(self.n_q)], timesteps, self.n_q)

    cached, uncached = Flat(2), Flat(2, cached=False)
    assert cached.get_pattern(3) is cached.get_pattern(3)
    assert uncached.get_pattern(3) is not uncached.get_pattern(3)
    assert uncached.get_pattern(3) == cached.get_pattern(3) == cached.make_pattern(3)
    assert repr(cached) == "Flat(n_q=2)"


# --------------------------------------------------------------------------- extras and the README


def test_from_coordinates_equals_the_list_form():
    pattern = Pattern.from_coordinates(
        torch.tensor([2, 1, 2]), torch.tensor([1, 0, 0]), torch.tensor([0, 0, 1]), num_steps=3, timesteps=2, n_q=2
    )
    assert pattern.layout == [[], [c(0, 0)], [c(0, 1), c(1, 0)]]  # a step keeps its coordinates' order
    assert pattern == Pattern([[], [(0, 0)], [(0, 1), (1, 0)]], timesteps=2, n_q=2)  # plain pairs too


def readme_section_blocks():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Codebook interleaving patterns", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_section_code_blocks_run():
    blocks = readme_section_blocks()
    assert len(blocks) == 2
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)  # the README section's own examples
    assert scope["logits"].shape == (2, 1024, 4, 50) and torch.isfinite(scope["loss"])
    assert scope["mask"].shape == (4, 50) and int(scope["mask"].sum()) == 4 * 50 - (1 + 2 + 3)
