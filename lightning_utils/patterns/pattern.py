"""A codebook interleaving pattern: which (timestep, codebook) entries each sequence step holds.

What it is for: a language model over multi-codebook audio tokens (RVQ codecs such as EnCodec,
DAC or Mimi give ``K`` codebooks per frame) reads one *sequence step* at a time, and a
:class:`Pattern` decides which code ``(t, q)`` sits at which step, e.g. MusicGen's delay
pattern puts codebook ``q`` of frame ``t`` at step ``t + q + 1``. ``Pattern`` turns codes
``[B, K, T]`` into the pattern's sequence ``[B, K, S]`` (empty cells hold a special token),
turns such a sequence back into codes, and maps model logits ``[B, card, K, S]`` back onto the
codes' timeline so that a loss can be taken against the input codes.

How: the layout is kept as three flat integer tensors (step, codebook, timestep) of all its
coordinates, and every conversion is one gather (``index_select``) through an index table
built from those tensors with scatter operations. The tables are cached per pattern, shape,
``keep_only_valid_steps`` and device.

Its methods, properties and results are those of audiocraft's ``Pattern`` (a dataclass of
``layout``, ``timesteps`` and ``n_q``, compared by value), the ``_build_*_scatter_indexes``
helpers included.

What it must never do: loop in Python over sequence steps or timesteps while converting,
mutate its inputs, or hand out its cached tables (callers get copies, so changing a returned
``mask`` in place cannot corrupt later calls).
"""

from __future__ import annotations

import numbers
import operator
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

__all__ = ["LayoutCoord", "Pattern", "PatternError", "PatternLayout"]

_V = TypeVar("_V")


class PatternError(ValueError, AssertionError):
    """Bad pattern arguments or input shapes.

    A ``ValueError``; also an ``AssertionError`` because audiocraft's ``codebooks_patterns``
    checks the same conditions with ``assert``, so code written against it keeps catching them.
    """


class LayoutCoord(NamedTuple):
    """One entry of a layout: timestep ``t`` of codebook ``q``."""

    t: int
    q: int


#: A layout written out as Python lists: ``layout[s]`` is the list of coordinates at step ``s``.
PatternLayout = list[list[LayoutCoord]]


def _as_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as a Python int, or a PatternError naming ``name`` (bools are not integers here)."""
    if isinstance(value, bool):
        raise PatternError(f"{name} must be an integer, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise PatternError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise PatternError(f"{name} must be >= {minimum}, got {out}")
    return out


class _BoundedCache:
    """A small least-recently-used cache; plain data so that its owner stays picklable."""

    def __init__(self, maxsize: int = 100) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], _V]) -> _V:
        try:
            self._items.move_to_end(key)
            return self._items[key]
        except KeyError:
            value = make()
            self._items[key] = value
            if len(self._items) > self.maxsize:
                self._items.popitem(last=False)
            return value

    def __len__(self) -> int:
        return len(self._items)


def _int_vector(name: str, values: Any) -> Tensor:
    tensor = torch.as_tensor(values)
    if tensor.dim() != 1 or tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise PatternError(
            f"{name} must be a 1-D integer tensor, got dtype {tensor.dtype} and shape {tuple(tensor.shape)}"
        )
    return tensor.to(device="cpu", dtype=torch.long).contiguous()


def _special_token_for(values: Tensor, special_token: Any) -> Any:
    """``special_token`` as a Python number that ``values``' dtype (after promotion) holds exactly.

    Integer codes keep their dtype under a Python int token, so a token outside that dtype's
    range would wrap (``-1`` in ``uint8`` codes is ``255``, a real code) or fail deep in torch.
    """
    if isinstance(special_token, Tensor):
        if special_token.numel() != 1:
            raise PatternError(
                f"special_token must be a number or a one-element tensor, got shape {tuple(special_token.shape)}"
            )
        special_token = special_token.item()
    if isinstance(special_token, numbers.Integral) and not isinstance(special_token, bool):
        special_token = int(special_token)  # numpy integers too
    elif isinstance(special_token, numbers.Real) and not isinstance(special_token, bool):
        special_token = float(special_token)
    elif not isinstance(special_token, bool):
        raise PatternError(f"special_token must be a real number, got {special_token!r}")
    dtype = torch.result_type(values, special_token)
    if not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
        info = torch.iinfo(dtype)
        if not info.min <= special_token <= info.max:
            raise PatternError(
                f"special_token={special_token} does not fit the codes' dtype {str(dtype).removeprefix('torch.')} "
                f"(range {info.min}..{info.max}); use a wider dtype or a token inside that range"
            )
    return special_token


class _IndexTable(NamedTuple):
    """One cached conversion: the public ``indexes``/``mask`` and the flat forms the gather uses."""

    indexes: Tensor  # [K, N]; the value n_sources means "the special token"
    mask: Tensor  # [K, N]; True where a real value is read
    gather: Tensor | None  # [K * N] in-range indexes (None when there is nothing to read)
    fill: Tensor  # [K * N]; True where the special token goes
    fill_index: Tensor | None  # positions of ``fill`` when they are few (None: use ``fill``)
    any_fill: bool
    # [K * N] indexes into the sources with the token appended (index n_sources), used when
    # the special cells are many and the sources fewer than the outputs (None otherwise).
    appended: Tensor | None

    @classmethod
    def make(cls, indexes: Tensor, mask: Tensor, n_sources: int) -> _IndexTable:
        gather = indexes.clamp(max=n_sources - 1).reshape(-1) if n_sources > 0 else None
        fill = (~mask).reshape(-1)
        positions = fill.nonzero().squeeze(1)
        # Few special cells (delay patterns: K * max_delay of them): write just those.
        fill_index = positions if positions.numel() * 8 <= fill.numel() else None
        # Many special cells: either gather then select the token into them (two passes over
        # the output) or append the token to a copy of the sources and gather once (one pass
        # over the sources, one over the output); the second wins when the sources are fewer,
        # as when an unrolled pattern spreads K * T codes over K * S mostly empty cells.
        appended = indexes.reshape(-1) if fill_index is None and n_sources < fill.numel() else None
        return cls(indexes, mask, gather, fill, fill_index, positions.numel() > 0, appended)

    def to(self, device: torch.device) -> _IndexTable:
        def move(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(device)

        return _IndexTable(
            self.indexes.to(device), self.mask.to(device), move(self.gather), self.fill.to(device),
            move(self.fill_index), self.any_fill, move(self.appended),
        )  # fmt: skip


class Pattern:
    """A layout of ``(t, q)`` coordinates over ``num_steps`` sequence steps, for ``n_q`` codebooks.

    Args:
        layout: ``layout[s]`` lists the :class:`LayoutCoord` (or ``(t, q)`` pairs) at sequence
            step ``s``. Within one codebook, timesteps must never decrease from step to step,
            and no step may hold the same codebook twice. A layout whose first step is empty
            starts with the special token (see :meth:`starts_with_special_token`).
        timesteps: the number of code timesteps ``T`` the pattern was made for.
        n_q: the number of codebooks ``K``.

    Coordinates with ``t >= timesteps`` are allowed (delay patterns run past the last frame);
    they hold the special token in built sequences. Providers build patterns through the
    faster :meth:`from_coordinates`.
    """

    def __init__(self, layout: Sequence[Sequence[Any]], timesteps: int, n_q: int) -> None:
        if len(layout) == 0:
            raise PatternError("layout must hold at least one sequence step")
        steps: list[int] = []
        codebooks: list[int] = []
        times: list[int] = []
        # Walking the definition once is fine: conversions never look at these lists again.
        for s, coords in enumerate(layout):
            for coord in coords:
                try:
                    t, q = coord
                except (TypeError, ValueError):
                    raise PatternError(f"layout[{s}] holds {coord!r}, not a (t, q) coordinate") from None
                steps.append(s)
                times.append(_as_int(f"layout[{s}] timestep", t))
                codebooks.append(_as_int(f"layout[{s}] codebook", q))
        self._setup(
            torch.tensor(steps, dtype=torch.long),
            torch.tensor(codebooks, dtype=torch.long),
            torch.tensor(times, dtype=torch.long),
            num_steps=len(layout),
            timesteps=timesteps,
            n_q=n_q,
        )

    @classmethod
    def from_coordinates(
        cls, steps: Any, codebooks: Any, times: Any, *, num_steps: int, timesteps: int, n_q: int
    ) -> Pattern:
        """A pattern from three parallel 1-D integer tensors: coordinate ``i`` is
        ``LayoutCoord(t=times[i], q=codebooks[i])`` at sequence step ``steps[i]``.

        Coordinates of one step keep their given order in :attr:`layout`. Validated like the
        list form.
        """
        pattern = cls.__new__(cls)
        pattern._setup(
            _int_vector("steps", steps),
            _int_vector("codebooks", codebooks),
            _int_vector("times", times),
            num_steps=num_steps,
            timesteps=timesteps,
            n_q=n_q,
        )
        return pattern

    def _setup(
        self, steps: Tensor, codebooks: Tensor, times: Tensor, *, num_steps: int, timesteps: int, n_q: int
    ) -> None:
        self.timesteps = _as_int("timesteps", timesteps, minimum=0)
        self.n_q = _as_int("n_q", n_q, minimum=1)
        self.num_steps = _as_int("num_steps", num_steps, minimum=1)
        if not (steps.shape == codebooks.shape == times.shape):
            raise PatternError(
                f"steps, codebooks and times must have the same length, got {steps.numel()}, "
                f"{codebooks.numel()} and {times.numel()}"
            )
        self._check_layout(steps, codebooks, times)
        # A stable sort by step keeps each step's coordinates in their given order.
        order = torch.argsort(steps, stable=True)
        self._steps = steps[order].contiguous()
        self._codebooks = codebooks[order].contiguous()
        self._times = times[order].contiguous()
        # How many frames past the last one the pattern reaches: the largest t + 1 over all
        # steps but the first (the special step of a usual pattern), minus timesteps.
        later = self._steps >= 1
        max_t = int((self._times[later] + 1).max()) if bool(later.any()) else 0
        self._max_delay = max_t - self.timesteps
        # ``layout[:num_steps - max_delay]`` with Python's slice rules (a negative end counts
        # from the back), which is how audiocraft defines the valid steps.
        self.num_valid_steps = len(range(self.num_steps)[: self.num_steps - self._max_delay])
        self._init_caches()

    def _check_layout(self, steps: Tensor, codebooks: Tensor, times: Tensor) -> None:
        if steps.numel() == 0:
            return
        bad = (steps < 0) | (steps >= self.num_steps)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise PatternError(f"layout: step {int(steps[i])} is outside [0, num_steps={self.num_steps})")
        bad = (codebooks < 0) | (codebooks >= self.n_q)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise PatternError(
                f"layout: step {int(steps[i])} holds codebook {int(codebooks[i])}, outside [0, n_q={self.n_q})"
            )
        bad = times < 0
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise PatternError(f"layout: step {int(steps[i])} holds a negative timestep {int(times[i])}")
        # Sorted by (codebook, step), each codebook's entries are contiguous and in step order.
        order = torch.argsort(codebooks * self.num_steps + steps, stable=True)
        q, s, t = codebooks[order], steps[order], times[order]
        same_q = q[1:] == q[:-1]
        twice = same_q & (s[1:] == s[:-1])
        if bool(twice.any()):
            i = int(twice.nonzero()[0])
            raise PatternError(f"layout: step {int(s[i])} holds codebook {int(q[i])} more than once")
        back = same_q & (t[1:] < t[:-1])
        if bool(back.any()):
            i = int(back.nonzero()[0])
            raise PatternError(
                f"layout: codebook {int(q[i])} goes back in time at step {int(s[i + 1])} "
                f"(timestep {int(t[i + 1])} after {int(t[i])})"
            )

    def _init_caches(self) -> None:
        self._sequence_tables = _BoundedCache(100)
        self._timeline_tables = _BoundedCache(100)
        self._layout: PatternLayout | None = None

    # Caches are rebuilt on demand; pickles (e.g. in saved hyperparameters) carry only the layout.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_sequence_tables", "_timeline_tables", "_layout"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "max_delay" in state:  # pickled before max_delay became a property
            state["_max_delay"] = state.pop("max_delay")
        self.__dict__.update(state)
        self._init_caches()

    def __eq__(self, other: object) -> bool:
        """Equal when ``layout``, ``timesteps`` and ``n_q`` are (as for a dataclass)."""
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Pattern)
        return (
            (self.timesteps, self.n_q, self.num_steps) == (other.timesteps, other.n_q, other.num_steps)
            and torch.equal(self._steps, other._steps)
            and torch.equal(self._codebooks, other._codebooks)
            and torch.equal(self._times, other._times)
        )

    # Equal patterns must hash equally and the layout is long: unhashable, like a dataclass.
    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ inspection

    @property
    def layout(self) -> PatternLayout:
        """The layout as lists: ``layout[s]`` is the list of coordinates at sequence step ``s``."""
        if self._layout is None:
            out: PatternLayout = [[] for _ in range(self.num_steps)]
            for s, t, q in zip(self._steps.tolist(), self._times.tolist(), self._codebooks.tolist()):
                out[s].append(LayoutCoord(t, q))
            self._layout = out
        return [list(coords) for coords in self._layout]

    @property
    def valid_layout(self) -> PatternLayout:
        """``layout[:num_steps - max_delay]`` (``len == num_valid_steps``).

        For delay patterns (delayed, parallel, coarse-first) these are exactly the steps before
        the first one that holds a coordinate past the last frame, so a model trained on them
        reads ``timesteps`` frames of codebook 0. Steps past them may still hold real codes of
        the later codebooks (dropped by ``keep_only_valid_steps=True``; the reverted ``mask``
        says which codes were kept). For unrolled patterns with delays the cut is by steps, not
        frames, so it can keep a step that holds a coordinate past the last frame. A layout
        reaching more than ``num_steps`` frames past the end gets Python's slice of a negative
        end (``layout[:-n]``), as in audiocraft.
        """
        return self.layout[: self.num_valid_steps]

    @property
    def max_delay(self) -> int:
        """How many frames past the last one the layout reaches: the largest ``t + 1`` over the
        steps after the first, minus :attr:`timesteps` (negative when it stops short)."""
        return self._max_delay

    @property
    def num_sequence_steps(self) -> int:
        """``num_steps - 1``: the steps after the leading one."""
        return self.num_steps - 1

    def starts_with_special_token(self) -> bool:
        """Whether step 0 is empty, i.e. every built sequence starts with the special token."""
        return self._steps.numel() == 0 or int(self._steps[0]) != 0

    def get_sequence_coords_with_timestep(self, t: int, q: int | None = None) -> list[tuple[int, LayoutCoord]]:
        """``(step, coord)`` for every coordinate at timestep ``t`` (of codebook ``q`` if given), in step order."""
        hit = self._times == t
        if q is not None:
            hit &= self._codebooks == q
        return [
            (s, LayoutCoord(tt, qq))
            for s, tt, qq in zip(self._steps[hit].tolist(), self._times[hit].tolist(), self._codebooks[hit].tolist())
        ]

    def get_steps_with_timestep(self, t: int, q: int | None = None) -> list[int]:
        """The step of every coordinate at timestep ``t`` (of codebook ``q`` if given), in step order."""
        return [s for s, _ in self.get_sequence_coords_with_timestep(t, q)]

    def get_first_step_with_timesteps(self, t: int, q: int | None = None) -> int | None:
        """The first step holding timestep ``t`` (of codebook ``q`` if given), or None."""
        steps = self.get_steps_with_timestep(t, q)
        return steps[0] if steps else None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_q={self.n_q}, timesteps={self.timesteps}, num_steps={self.num_steps}, "
            f"max_delay={self.max_delay})"
        )

    # ------------------------------------------------------------------ index tables

    def _steps_in_use(self, keep_only_valid_steps: bool) -> int:
        return self.num_valid_steps if keep_only_valid_steps else self.num_steps

    def _make_sequence_tables(self, timesteps: int, keep_only_valid_steps: bool) -> _IndexTable:
        """``indexes[q, s]``: where step ``s`` of codebook ``q`` reads from the flattened codes
        ``[K * T]``, ``K * T`` meaning the special token; ``mask``: it reads a real code."""
        n_q, n_steps = self.n_q, self._steps_in_use(keep_only_valid_steps)
        use = (self._steps < n_steps) & (self._times < timesteps)
        q, s, t = self._codebooks[use], self._steps[use], self._times[use]
        indexes = torch.full((n_q, n_steps), n_q * timesteps, dtype=torch.long)
        mask = torch.zeros((n_q, n_steps), dtype=torch.bool)
        # A step never holds a codebook twice (checked), so these writes never collide.
        indexes[q, s] = q * timesteps + t
        mask[q, s] = True
        return _IndexTable.make(indexes, mask, n_q * timesteps)

    def _make_timeline_tables(
        self, sequence_steps: int, keep_only_valid_steps: bool, is_model_output: bool
    ) -> _IndexTable:
        """``indexes[q, t]``: where code ``(t, q)`` is read from the flattened sequence
        ``[K * S]``, ``K * S`` meaning the special token; ``mask``: the code was found."""
        n_q, timesteps = self.n_q, self.timesteps
        n_steps = self._steps_in_use(keep_only_valid_steps)
        # A model's output at step s predicts the input at step s + 1, so when the pattern
        # starts with the special token, step s + 1 of the layout is read from output s.
        shift = 1 if is_model_output and self.starts_with_special_token() else 0
        position = self._steps - shift
        use = (position >= 0) & (self._steps < n_steps) & (position < sequence_steps) & (self._times < timesteps)
        q, t, position = self._codebooks[use], self._times[use], position[use]
        flat = torch.full((n_q * timesteps,), -1, dtype=torch.long)
        # A code may sit at several steps (timesteps may repeat); the last step holding it wins.
        flat.scatter_reduce_(0, q * timesteps + t, q * sequence_steps + position, reduce="amax")
        mask = flat >= 0
        flat[~mask] = n_q * sequence_steps
        return _IndexTable.make(flat.view(n_q, timesteps), mask.view(n_q, timesteps), n_q * sequence_steps)

    def _sequence_tables_on(self, timesteps: int, keep: bool, device: torch.device) -> _IndexTable:
        cpu = self._sequence_tables.get((timesteps, keep, None), lambda: self._make_sequence_tables(timesteps, keep))
        if device.type == "cpu":
            return cpu
        return self._sequence_tables.get((timesteps, keep, device), lambda: cpu.to(device))

    def _timeline_tables_on(
        self, sequence_steps: int, keep: bool, is_model_output: bool, device: torch.device
    ) -> _IndexTable:
        key = (sequence_steps, keep, is_model_output)
        cpu = self._timeline_tables.get((*key, None), lambda: self._make_timeline_tables(*key))
        if device.type == "cpu":
            return cpu
        return self._timeline_tables.get((*key, device), lambda: cpu.to(device))

    def _check_helper_n_q(self, n_q: int) -> None:
        if n_q != self.n_q:
            raise PatternError(f"n_q={n_q} does not match the pattern's n_q={self.n_q}")

    def _build_pattern_sequence_scatter_indexes(
        self, timesteps: int, n_q: int, keep_only_valid_steps: bool, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """The index table :meth:`build_pattern_sequence` gathers through, for codes ``[B, n_q, timesteps]``.

        Returns:
            ``(indexes [K, S], mask [K, S])`` on ``device``: ``indexes[q, s]`` is where step
            ``s`` of codebook ``q`` reads from the codes flattened to ``[K * timesteps]``
            (``K * timesteps`` means the special token); ``mask`` is true where it reads a code.
        """
        self._check_helper_n_q(n_q)
        timesteps = _as_int("timesteps", timesteps, minimum=0)
        if timesteps > self.timesteps:
            raise PatternError(f"timesteps={timesteps} is more than the pattern's timesteps={self.timesteps}")
        table = self._sequence_tables_on(timesteps, bool(keep_only_valid_steps), torch.device(device))
        return table.indexes.clone(), table.mask.clone()

    def _build_reverted_sequence_scatter_indexes(
        self,
        sequence_steps: int,
        n_q: int,
        keep_only_valid_steps: bool = False,
        is_model_output: bool = False,
        device: torch.device | str = "cpu",
    ) -> tuple[Tensor, Tensor]:
        """The index table :meth:`revert_pattern_sequence` (``is_model_output=False``) or
        :meth:`revert_pattern_logits` (``True``) gathers through, for ``sequence_steps`` steps.

        Returns:
            ``(indexes [K, timesteps], mask [K, timesteps])`` on ``device``: ``indexes[q, t]``
            is where code ``(t, q)`` is read from the sequence flattened to
            ``[K * sequence_steps]`` (``K * sequence_steps`` means the special token); ``mask``
            is true where the code is found.
        """
        self._check_helper_n_q(n_q)
        sequence_steps = _as_int("sequence_steps", sequence_steps, minimum=0)
        keep = bool(keep_only_valid_steps)
        if sequence_steps > self._steps_in_use(keep):
            which = "valid steps" if keep else "steps"
            raise PatternError(
                f"sequence_steps={sequence_steps} is more than the pattern's {self._steps_in_use(keep)} {which}"
            )
        table = self._timeline_tables_on(sequence_steps, keep, bool(is_model_output), torch.device(device))
        return table.indexes.clone(), table.mask.clone()

    # ------------------------------------------------------------------ conversions

    def _check_codebooks(self, name: str, tensor: Tensor, layout: str, ndim: int, dim: int) -> None:
        """``tensor`` has ``ndim`` dimensions (named in ``layout``) and ``n_q`` codebooks at ``dim``."""
        if not isinstance(tensor, Tensor):
            raise PatternError(f"{name} must be a torch.Tensor of shape {layout}, got {type(tensor).__name__}")
        if tensor.dim() != ndim:
            raise PatternError(f"{name} must have shape {layout}, got shape {tuple(tensor.shape)}")
        if tensor.shape[dim] != self.n_q:
            raise PatternError(
                f"{name} has {tensor.shape[dim]} codebooks (shape {tuple(tensor.shape)}) but the pattern has n_q={self.n_q}"
            )

    def _check_sequence_steps(self, name: str, steps: int, keep: bool) -> None:
        limit = self._steps_in_use(keep)
        if steps > limit:
            which = "valid steps" if keep else "steps"
            raise PatternError(f"{name} has {steps} sequence steps but the pattern has only {limit} {which}")

    @staticmethod
    def _gather_with_special(flat: Tensor, table: _IndexTable, special_token: Any) -> Tensor:
        """``flat[..., table.indexes]``, where the index ``flat.shape[-1]`` reads ``special_token``.

        The result's dtype follows torch's promotion of ``flat`` with ``special_token`` (a float
        token such as ``nan`` over integer codes gives floats), so the token is never truncated.
        """
        special_token = _special_token_for(flat, special_token)
        dtype = torch.result_type(flat, special_token)
        if table.gather is None:  # nothing to read from: every cell is special
            return torch.full((*flat.shape[:-1], table.fill.numel()), special_token, dtype=dtype, device=flat.device)
        if table.any_fill and table.appended is not None:
            token = torch.full((*flat.shape[:-1], 1), special_token, dtype=dtype, device=flat.device)
            return torch.cat([flat.to(dtype), token], dim=-1).index_select(-1, table.appended)
        # Gather with in-range indexes, then overwrite the special cells: cheaper than
        # appending the token to a copy of the whole input when the input is the larger.
        values = flat.index_select(-1, table.gather).to(dtype)
        if not table.any_fill:
            return values
        if table.fill_index is not None:
            return values.index_fill_(-1, table.fill_index, special_token)
        # Mostly special cells: one select over all of them. torch.where rather than
        # masked_fill_, whose parallel loop was ~100x slower on a busy 2-core machine.
        return torch.where(table.fill, torch.tensor(special_token, dtype=dtype, device=values.device), values)

    def build_pattern_sequence(
        self, z: Tensor, special_token: Any, keep_only_valid_steps: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Lay codes out along the pattern.

        Args:
            z: codes ``[B, K, T]`` with ``K == n_q`` and ``T <= timesteps`` (any layout in memory).
            special_token: the value for cells that hold no code.
            keep_only_valid_steps: keep only the first :attr:`num_valid_steps` steps.

        Returns:
            ``(values [B, K, S], indexes [K, S], mask [K, S])``: ``indexes`` point into ``z``
            flattened to ``[B, K * T]`` (``K * T`` means the special token) and ``mask`` is true
            where a cell holds a code.
        """
        self._check_codebooks("z", z, "[B, K, T]", ndim=3, dim=1)
        batch, n_q, timesteps = z.shape
        if timesteps > self.timesteps:
            raise PatternError(f"z has {timesteps} timesteps, more than the pattern's timesteps={self.timesteps}")
        table = self._sequence_tables_on(timesteps, bool(keep_only_valid_steps), z.device)
        values = self._gather_with_special(z.reshape(batch, n_q * timesteps), table, special_token)
        return values.view(batch, n_q, table.indexes.shape[-1]), table.indexes.clone(), table.mask.clone()

    def revert_pattern_sequence(
        self, s: Tensor, special_token: Any, keep_only_valid_steps: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Read codes back from a pattern sequence (the inverse of :meth:`build_pattern_sequence`).

        Args:
            s: a sequence ``[B, K, S]`` laid out along this pattern, ``S`` at most the number of
                steps in use (fewer for a partly generated sequence).
            special_token: the value for codes the sequence does not hold.
            keep_only_valid_steps: the sequence was built with ``keep_only_valid_steps=True``.

        Returns:
            ``(values [B, K, timesteps], indexes [K, timesteps], mask [K, timesteps])``, with
            ``mask`` true where the code was found in ``s``.
        """
        self._check_codebooks("s", s, "[B, K, S]", ndim=3, dim=1)
        batch, n_q, steps = s.shape
        self._check_sequence_steps("s", steps, bool(keep_only_valid_steps))
        table = self._timeline_tables_on(steps, bool(keep_only_valid_steps), False, s.device)
        values = self._gather_with_special(s.reshape(batch, n_q * steps), table, special_token)
        return values.view(batch, n_q, self.timesteps), table.indexes.clone(), table.mask.clone()

    def revert_pattern_logits(
        self, logits: Tensor, special_token: Any, keep_only_valid_steps: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Map a model's output logits back onto the codes' timeline.

        The output at step ``s`` is the model's prediction for the input at step ``s + 1`` when
        the pattern starts with the special token, so this reads code ``(t, q)`` from the step
        before the one that holds it. A pattern whose first step holds codes (e.g.
        ``DelayedPatternProvider(empty_initial=-1)``) is read without that shift: the output at
        step ``s`` must then already be the prediction for step ``s`` (shift a next-step model's
        outputs yourself).

        Args:
            logits: ``[B, card, K, S]`` (``card`` classes per code).
            special_token: the value for codes without a prediction (e.g. ``float("nan")``).
            keep_only_valid_steps: the input sequence was built with ``keep_only_valid_steps=True``.

        Returns:
            ``(values [B, card, K, timesteps], indexes [K, timesteps], mask [K, timesteps])``.
        """
        self._check_codebooks("logits", logits, "[B, card, K, S]", ndim=4, dim=2)
        batch, card, n_q, steps = logits.shape
        self._check_sequence_steps("logits", steps, bool(keep_only_valid_steps))
        table = self._timeline_tables_on(steps, bool(keep_only_valid_steps), True, logits.device)
        values = self._gather_with_special(logits.reshape(batch, card, n_q * steps), table, special_token)
        return values.view(batch, card, n_q, self.timesteps), table.indexes.clone(), table.mask.clone()
