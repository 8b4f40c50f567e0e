"""Pattern providers: the standard codebook interleavings, each a :class:`Pattern` per length.

What it is for: a multi-codebook token model picks one provider (by class path in a LightningCLI
config, e.g. ``lightning_utils.patterns.DelayedPatternProvider``) and asks it for the pattern
of each sequence length with :meth:`CodebooksPatternProvider.get_pattern`, which caches the
last 100 patterns (and each pattern caches its index tables).

The layouts, for ``n_q = K`` codebooks and ``T`` timesteps (step 0 is the special token):

* :class:`DelayedPatternProvider` (MusicGen's delay pattern): code ``(t, q)`` at step
  ``1 + t + delays[q]``; ``delays`` defaults to ``0, 1, ..., K - 1``. Every codebook runs on
  until the most delayed one has reached frame ``T - 1``, so the less delayed ones hold
  coordinates past the end (``t >= T``; special tokens in built sequences).
* :class:`ParallelPatternProvider`: all codebooks of frame ``t`` at step ``1 + t``.
* :class:`UnrolledPatternProvider`: each frame unrolled into inner steps, ``flattening[q]``
  naming codebook ``q``'s inner step (codebooks sharing one stay in parallel), optionally
  delayed; the default flattens fully, one codebook per step.
* :class:`CoarseFirstPattern`: all of codebook 0 first, then the other codebooks, delayed.
* :class:`MusicLMPattern`: codebooks in groups of ``group_by``, each group flattened over the
  whole sequence before the next group starts.

Classes, arguments, defaults, attributes and layouts are those of audiocraft's
``codebooks_patterns`` (``timesteps=0`` included), so either can replace the other.

What it must never do: build layouts with Python loops over timesteps (they are made with
tensor arithmetic, so a 3000-frame pattern costs about as little as a 30-frame one), or accept
arguments that give a pattern that cannot be reverted (a PatternError names the argument).
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_utils.patterns.pattern import Pattern, PatternError, _as_int, _BoundedCache

__all__ = [
    "CoarseFirstPattern",
    "CodebooksPatternProvider",
    "DelayedPatternProvider",
    "MusicLMPattern",
    "ParallelPatternProvider",
    "UnrolledPatternProvider",
]


def _int_list(name: str, values: Any, length: int, *, non_decreasing: bool = True) -> list[int]:
    """``values`` as a list of ``length`` non-negative ints (non-decreasing), or a PatternError naming ``name``."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise PatternError(f"{name} must be a list of {length} integers, got {values!r}")
    out = [_as_int(f"{name}[{i}]", v) for i, v in enumerate(values)]
    if len(out) != length:
        raise PatternError(f"{name} must have {length} entries, got {len(out)}: {out}")
    for i, v in enumerate(out):
        if v < 0:
            raise PatternError(f"{name}[{i}] must be >= 0, got {v} (in {out})")
    if non_decreasing:
        for i in range(1, len(out)):
            if out[i] < out[i - 1]:
                raise PatternError(f"{name} must be non-decreasing, got {out} ({name}[{i}] < {name}[{i - 1}])")
    return out


class CodebooksPatternProvider(ABC):
    """Base of the pattern providers: ``get_pattern(timesteps)`` returns a cached :class:`Pattern`.

    Args:
        n_q: the number of codebooks.
        cached: keep the last 100 patterns (by ``timesteps``); turn off for providers whose
            subclass changes its layout between calls.

    Subclasses implement :meth:`make_pattern`, or, as audiocraft's providers do,
    :meth:`get_pattern` itself (it is then cached all the same, and ``make_pattern`` calls it).
    """

    def __init__(self, n_q: int, cached: bool = True) -> None:
        self.n_q = _as_int("n_q", n_q, minimum=1)
        self.cached = bool(cached)
        self._patterns = _BoundedCache(100)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("get_pattern")
        if own is None or not callable(own) or getattr(own, "_caches_patterns", False):
            return
        # audiocraft's extension point is get_pattern: cache what the subclass wrote under
        # its own key (a super().get_pattern call inside it caches the parent's pattern apart).
        cls.get_pattern = _caching_get_pattern(own)  # type: ignore[method-assign, assignment]
        if getattr(cls.make_pattern, "__isabstractmethod__", False):
            cls.make_pattern = _make_pattern_with(own)  # type: ignore[method-assign, assignment]

    def get_pattern(self, timesteps: int) -> Pattern:
        """The pattern for sequences of ``timesteps`` code frames (``0`` included)."""
        if getattr(type(self).make_pattern, "_calls_get_pattern", False):
            # Only a subclass's get_pattern calling super().get_pattern() gets here: the base
            # has no layout of its own, and going on would call that get_pattern again.
            raise NotImplementedError(f"{type(self).__name__}.get_pattern must build the pattern itself")
        timesteps = _as_int("timesteps", timesteps, minimum=0)
        if not getattr(self, "cached", True):
            return self.make_pattern(timesteps)
        return self._pattern_cache().get(timesteps, lambda: self.make_pattern(timesteps))

    @abstractmethod
    def make_pattern(self, timesteps: int) -> Pattern:
        """Build (uncached) the pattern for ``timesteps`` frames; called by :meth:`get_pattern`."""

    def _pattern_cache(self) -> _BoundedCache:
        # A subclass whose __init__ skips ours still gets a cache.
        cache = self.__dict__.get("_patterns")
        if cache is None:
            cache = self._patterns = _BoundedCache(100)
        return cache

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_patterns", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patterns = _BoundedCache(100)

    def __repr__(self) -> str:
        """The constructor call: each ``__init__`` argument the provider keeps as an attribute."""
        names = [
            p.name
            for p in inspect.signature(type(self).__init__).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "cached")
        ]
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in names if hasattr(self, name))
        return f"{type(self).__name__}({args})"


def _caching_get_pattern(build: Callable[[Any, int], Pattern]) -> Callable[[Any, int], Pattern]:
    """``build`` (a subclass's own ``get_pattern``) behind the provider's pattern cache."""

    @functools.wraps(build)
    def get_pattern(self: CodebooksPatternProvider, timesteps: int) -> Pattern:
        timesteps = _as_int("timesteps", timesteps, minimum=0)
        if not getattr(self, "cached", True):
            return build(self, timesteps)
        return self._pattern_cache().get((build, timesteps), lambda: build(self, timesteps))

    get_pattern._caches_patterns = True  # type: ignore[attr-defined]
    return get_pattern


def _make_pattern_with(build: Callable[[Any, int], Pattern]) -> Callable[[Any, int], Pattern]:
    """``make_pattern`` for a subclass that only wrote ``get_pattern``: that, uncached."""

    def make_pattern(self: CodebooksPatternProvider, timesteps: int) -> Pattern:
        return build(self, _as_int("timesteps", timesteps, minimum=0))

    make_pattern.__doc__ = CodebooksPatternProvider.make_pattern.__doc__
    make_pattern._calls_get_pattern = True  # type: ignore[attr-defined]
    return make_pattern


def _delayed_coordinates(
    timesteps: int, delays: list[int], first_step: int, first_timestep: int = 0
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Codebook ``q`` of frame ``t >= first_timestep`` at step
    ``first_step + (t - first_timestep) + delays[q]``, running on until every codebook has
    reached frame ``timesteps - 1``. Returns ``(steps, codebooks, times, steps used)``."""
    n_steps = max(0, timesteps + max(delays) - first_timestep)
    delay = torch.tensor(delays, dtype=torch.long)
    step = torch.arange(n_steps, dtype=torch.long).unsqueeze(1)  # [n_steps, 1]
    time = first_timestep + step - delay  # [n_steps, K]: the frame each codebook is at
    present = time >= first_timestep
    codebook = torch.arange(len(delays), dtype=torch.long).expand_as(time)
    # Boolean indexing reads row-major: step order, codebooks ascending within a step.
    return (first_step + step.expand_as(time))[present], codebook[present], time[present], n_steps


class DelayedPatternProvider(CodebooksPatternProvider):
    """Delay pattern: codebook ``q`` is ``delays[q]`` steps behind the frame it belongs to.

    With ``n_q = 3``, ``T = 4`` and the default delays ``[0, 1, 2]``, codes ``[1, 2, 3, 4]``
    on every codebook become (``S`` = special token)::

        [[S, 1, 2, 3, 4, S, S],
         [S, S, 1, 2, 3, 4, S],
         [S, S, S, 1, 2, 3, 4]]

    Args:
        n_q: the number of codebooks.
        delays: non-negative, non-decreasing delay per codebook; ``None`` means ``range(n_q)``.
        flatten_first: lay the first ``flatten_first`` frames out fully flattened (one code per
            step) before the delayed part.
        empty_initial: extra empty steps after the leading special step; a negative value drops
            the leading special step too.
    """

    def __init__(
        self, n_q: int, delays: list[int] | None = None, flatten_first: int = 0, empty_initial: int = 0
    ) -> None:
        super().__init__(n_q)
        self.delays = _int_list("delays", list(range(self.n_q)) if delays is None else delays, self.n_q)
        self.flatten_first = _as_int("flatten_first", flatten_first, minimum=0)
        self.empty_initial = _as_int("empty_initial", empty_initial)

    def make_pattern(self, timesteps: int) -> Pattern:
        lead = 0 if self.empty_initial < 0 else 1 + self.empty_initial
        # Flattened head: frame t, codebook q at step lead + t * n_q + q.
        flat_frames = min(timesteps, self.flatten_first)
        head_t, head_q = torch.meshgrid(
            torch.arange(flat_frames, dtype=torch.long), torch.arange(self.n_q, dtype=torch.long), indexing="ij"
        )
        head_steps = lead + head_t * self.n_q + head_q
        first_delayed = lead + flat_frames * self.n_q
        steps, codebooks, times, n_delayed = _delayed_coordinates(
            timesteps, self.delays, first_delayed, first_timestep=self.flatten_first
        )
        return Pattern.from_coordinates(
            torch.cat([head_steps.reshape(-1), steps]),
            torch.cat([head_q.reshape(-1), codebooks]),
            torch.cat([head_t.reshape(-1), times]),
            num_steps=first_delayed + n_delayed,
            timesteps=timesteps,
            n_q=self.n_q,
        )


class ParallelPatternProvider(DelayedPatternProvider):
    """All codebooks of a frame at the same step: a delay pattern with every delay 0.

    Args:
        n_q: the number of codebooks.
        empty_initial: as in :class:`DelayedPatternProvider`.
    """

    def __init__(self, n_q: int, empty_initial: int = 0) -> None:
        super().__init__(n_q, [0] * _as_int("n_q", n_q, minimum=1), empty_initial=empty_initial)


class UnrolledPatternProvider(CodebooksPatternProvider):
    """Each frame unrolled over inner steps: codebook ``q`` goes to inner step ``flattening[q]``.

    Codebooks sharing an inner step stay in parallel; an inner step no codebook names stays
    empty. ``delays[q]`` moves codebook ``q``'s entries that many frames later (codebooks
    sharing an inner step must share a delay). Steps are ordered by delayed frame, then by the
    entries' own frame and first codebook.

    With ``n_q = 3``, ``T = 4`` and the defaults (``flattening = range(n_q)``, no delays), codes
    ``[1, 2, 3, 4]`` on every codebook become (``S`` = special token)::

        [[S, 1, S, S, 2, S, S, 3, S, S, 4, S, S],
         [S, S, 1, S, S, 2, S, S, 3, S, S, 4, S],
         [S, S, S, 1, S, S, 2, S, S, 3, S, S, 4]]

    Args:
        n_q: the number of codebooks.
        flattening: non-negative, non-decreasing inner step per codebook; ``None`` means ``range(n_q)``.
        delays: non-negative, non-decreasing delay per codebook; ``None`` means all 0.

    Attributes:
        max_delay: ``max(delays)``: the pattern runs that many frames past the last one.
    """

    class FlattenedCodebook(NamedTuple):
        """The codebooks of one inner step and their shared delay."""

        codebooks: list[int]
        delay: int

    def __init__(self, n_q: int, flattening: list[int] | None = None, delays: list[int] | None = None) -> None:
        super().__init__(n_q)
        self.flattening = _int_list("flattening", list(range(self.n_q)) if flattening is None else flattening, self.n_q)
        self.delays = _int_list("delays", [0] * self.n_q if delays is None else delays, self.n_q)
        for q in range(1, self.n_q):
            if self.flattening[q] == self.flattening[q - 1] and self.delays[q] != self.delays[q - 1]:
                raise PatternError(
                    f"delays: codebooks {q - 1} and {q} share inner step {self.flattening[q]} (flattening="
                    f"{self.flattening}) so they must share a delay, got {self.delays[q - 1]} and {self.delays[q]}"
                )
        self.max_delay = max(self.delays)
        # inner step -> its codebooks and delay (inner steps no codebook names are absent)
        self._flattened_codebooks: dict[int, UnrolledPatternProvider.FlattenedCodebook] = {}
        for q, (inner, delay) in enumerate(zip(self.flattening, self.delays)):
            self._flattened_codebooks.setdefault(inner, self.FlattenedCodebook([], delay)).codebooks.append(q)

    @property
    def _num_inner_steps(self) -> int:
        """Sequence steps per frame: one per inner step up to the last one named."""
        return max(self.flattening) + 1

    def num_virtual_steps(self, timesteps: int) -> int:
        """``timesteps * inner steps + 1``: the pattern's length for ``timesteps`` frames
        without delays (the leading special step, then every inner step of every frame);
        delays add ``max_delay`` steps to it."""
        return _as_int("timesteps", timesteps, minimum=0) * self._num_inner_steps + 1

    def make_pattern(self, timesteps: int) -> Pattern:
        n_q, n_inner = self.n_q, self._num_inner_steps
        end = timesteps + max(self.delays)  # frames run on until the most delayed one has ended
        flattening = torch.tensor(self.flattening, dtype=torch.long)
        member = flattening.unsqueeze(1) == torch.arange(n_inner).unsqueeze(0)  # [K, n_inner]
        used = member.any(0)
        # Per inner step: its delay and its first codebook (any codebook of it, for unused ones).
        first_q = torch.where(used, member.to(torch.long).argmax(0), torch.zeros(n_inner, dtype=torch.long))
        delay = torch.tensor(self.delays, dtype=torch.long)[first_q]
        # One entry per (frame, inner step); used inner steps are placed at their delayed frame.
        time = torch.arange(end, dtype=torch.long).unsqueeze(1).expand(end, n_inner)
        inner = torch.arange(n_inner, dtype=torch.long).expand(end, n_inner)
        key = torch.where(used, time + delay, time)
        keep = key < end
        time, inner, key = time[keep], inner[keep], key[keep]
        empty = ~used[inner]
        # Sort by (delayed frame, own frame, first codebook), an empty entry before any other
        # at the same delayed frame (empty entries among themselves are interchangeable).
        own_t = torch.where(empty, -1, time) + 1
        own_q = torch.where(empty, -1, first_q[inner]) + 1
        order = torch.argsort((key * (end + 1) + own_t) * (n_q + 1) + own_q, stable=True)
        time, inner = time[order], inner[order]
        entry_step = 1 + torch.arange(time.numel(), dtype=torch.long)  # step 0 is the special token
        # Expand each entry into its codebooks, row-major: step order, codebooks ascending.
        holds = member.T[inner]  # [entries, K]
        steps = entry_step.unsqueeze(1).expand_as(holds)[holds]
        codebooks = torch.arange(n_q, dtype=torch.long).expand_as(holds)[holds]
        times = time.unsqueeze(1).expand_as(holds)[holds]
        return Pattern.from_coordinates(
            steps, codebooks, times, num_steps=1 + entry_step.numel(), timesteps=timesteps, n_q=n_q
        )


class CoarseFirstPattern(CodebooksPatternProvider):
    """All frames of codebook 0 first, then codebooks ``1 .. n_q - 1`` with a delay pattern.

    The fine codebooks are not causal with respect to the coarse one, so generation must
    always produce the full training length.

    Args:
        n_q: the number of codebooks (at least 2).
        delays: non-negative, non-decreasing delay for each of codebooks ``1 .. n_q - 1``
            (``n_q - 1`` entries); ``None`` means all 0.
    """

    def __init__(self, n_q: int, delays: list[int] | None = None) -> None:
        super().__init__(n_q)
        if self.n_q < 2:
            raise PatternError(
                f"n_q must be >= 2 for a coarse-first pattern (one coarse, then fine codebooks), got {n_q}"
            )
        self.delays = _int_list("delays", [0] * (self.n_q - 1) if delays is None else delays, self.n_q - 1)

    def make_pattern(self, timesteps: int) -> Pattern:
        coarse_t = torch.arange(timesteps, dtype=torch.long)
        steps, codebooks, times, n_fine = _delayed_coordinates(timesteps, self.delays, first_step=1 + timesteps)
        return Pattern.from_coordinates(
            torch.cat([1 + coarse_t, steps]),
            torch.cat([torch.zeros_like(coarse_t), codebooks + 1]),
            torch.cat([coarse_t, times]),
            num_steps=1 + timesteps + n_fine,
            timesteps=timesteps,
            n_q=self.n_q,
        )


class MusicLMPattern(CodebooksPatternProvider):
    """Codebooks in groups of ``group_by``: group ``g`` is flattened over all frames
    (frame by frame, codebooks ascending) before group ``g + 1`` starts.

    Args:
        n_q: the number of codebooks, a multiple of ``group_by``.
        group_by: codebooks per group.
    """

    def __init__(self, n_q: int, group_by: int = 2) -> None:
        super().__init__(n_q)
        self.group_by = _as_int("group_by", group_by, minimum=1)
        if self.n_q % self.group_by:
            raise PatternError(f"group_by={self.group_by} must divide n_q={self.n_q}")

    def make_pattern(self, timesteps: int) -> Pattern:
        groups = self.n_q // self.group_by
        # Row-major over [group, frame, codebook within group] is exactly the step order.
        g, t, j = torch.meshgrid(
            torch.arange(groups), torch.arange(timesteps), torch.arange(self.group_by), indexing="ij"
        )
        return Pattern.from_coordinates(
            1 + torch.arange(g.numel(), dtype=torch.long),
            (g * self.group_by + j).reshape(-1),
            t.reshape(-1),
            num_steps=1 + g.numel(),
            timesteps=timesteps,
            n_q=self.n_q,
        )
