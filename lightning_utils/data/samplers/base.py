"""The resumable, rank-sharded sampler base class, and the contract ``ResumableDataLoader`` relies on.

Model: each epoch defines a *global sequence* of units (indices, or index lists for batch
samplers) that is a pure function of the sampler's arguments and the epoch number. Rank ``r``
of ``R`` takes the units at global positions ``start + r, start + r + R, ...``. The sampler's
state is the epoch and the *global* position reached (``start + R * units_yielded_per_rank``),
a couple of integers that are the same on every rank, so rank 0's checkpoint restores all
ranks, and a different world size continues the same epoch without repeating or skipping.

The resume contract. :class:`~lightning_utils.data.loader.ResumableDataLoader` uses a sampler
only through its user-facing API (``state_dict``, ``load_state_dict``, ``set_epoch``, ``iter``,
``len``) and these five operations of :class:`ResumableSampler`:

- :meth:`~ResumableSampler.plan_pass`: the :class:`Pass` the next ``iter()`` will run (which
  epoch, from which global position, on which shard, how many units), changing nothing;
- :meth:`~ResumableSampler.state_after`: the state after this rank consumed ``k`` units of a
  pass, the loader's answer to "where is training?" while workers run ahead;
- :meth:`~ResumableSampler.bookmark` / :meth:`~ResumableSampler.seek`: read and set where
  the next pass starts (a :class:`Bookmark`), so the loader can resume after the consumed
  units, run an evaluation pass from the start of the epoch and then put training back;
- :meth:`~ResumableSampler.state_at`: the state of a sampler standing at a bookmark
  (``state_dict()`` is ``state_at(bookmark())``).

The shard: rank ``r`` of ``R`` is the *data-parallel* rank and size. They come from the
constructor, else from :meth:`ResumableSampler.set_replicas` (how a training framework that
knows its data-parallel split, e.g. Lightning's ``trainer.distributed_sampler_kwargs`` through
``ResumableDataLoader``, passes it in), else from ``torch.distributed`` (world size and global
rank), read when a pass starts.

Lightning compatibility: :class:`ResumableSampler` subclasses ``DistributedSampler`` so that
``Trainer(use_distributed_sampler=True)`` (the default) leaves it in place instead of wrapping
it in ``DistributedSamplerWrapper``, which would hide its state. It never calls
``DistributedSampler.__init__``, which would need a dataset and a live process group.

This module must never materialise an epoch's order, never read ``torch.distributed`` before
iteration starts, and never let ``set_epoch`` discard a restored position of the same epoch.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch.utils.data.distributed import DistributedSampler

from lightning_utils.data.samplers.permutation import KeyedPermutation
from lightning_utils.data.samplers.rank import check_replica_args, resolve_replicas

__all__ = ["Bookmark", "Pass", "ResumableSampler"]

_STATE_VERSION = 1
_FIRST_BLOCK = 64
_MAX_BLOCK = 8192


@dataclass(frozen=True)
class Pass:
    """One iteration over (the rest of) an epoch, as seen by one rank."""

    epoch: int
    start: int  # global position the pass starts at
    num_replicas: int
    rank: int
    length: int | None  # units this rank yields; None for an endless sampler
    epoch_size: int  # units in the epoch's global sequence, all ranks (the pool size if endless)
    epoch_arg: int | None = None  # the last ``set_epoch`` value in force (None: never called)


@dataclass(frozen=True)
class Bookmark:
    """Where a sampler stands between passes: what :meth:`ResumableSampler.bookmark` reads and
    :meth:`ResumableSampler.seek` sets.

    ``epoch`` and ``position`` are the epoch and global position reached; ``epoch_arg`` is the
    last ``set_epoch`` value that took effect (``None``: never called) and ``requested`` a
    ``set_epoch`` value that no pass has taken up yet (``None``: none pending).
    """

    epoch: int
    position: int
    epoch_arg: int | None = None
    requested: int | None = None

    def effective(self) -> tuple[int, int]:
        """``(epoch, position)`` the sampler reports and the next pass starts from (before it
        rolls over a used-up epoch).

        A pending ``set_epoch`` of another epoch starts that epoch from its beginning; the same
        epoch changes nothing. "The same" means the value of the previous ``set_epoch``, not the
        running epoch, which runs ahead when a pass rolls over on its own (a short loader cycled
        by ``CombinedLoader``): Lightning's ``set_epoch(same)`` must not reset that.
        """
        requested = self.requested
        base = self.epoch if self.epoch_arg is None else self.epoch_arg
        if requested is not None and requested != base:
            return requested, 0
        return self.epoch, self.position

    def epoch_arg_in_force(self) -> int | None:
        """The ``set_epoch`` value the next pass runs under."""
        return self.epoch_arg if self.requested is None else self.requested


class ResumableSampler(DistributedSampler):
    """Base class: O(1) resumable state, lazy rank resolution, ``set_epoch`` that keeps positions.

    Subclasses define :meth:`_epoch_size`, :meth:`_units` and :meth:`_identity`, and set
    ``_STATE_NAME`` (the ``"sampler"`` entry of the state) and ``_REQUIRED_KEYS``. The public
    methods under "resume contract" are what ``ResumableDataLoader`` uses (see the module
    docstring).
    """

    _STATE_NAME: ClassVar[str] = "ResumableSampler"
    _REQUIRED_KEYS: ClassVar[frozenset[str]] = frozenset({"position"})
    _ENDLESS: ClassVar[bool] = False
    _SHUFFLES: ClassVar[bool] = False

    def __init__(self, *, num_replicas: int | None, rank: int | None, drop_last: bool, seed: int) -> None:
        # Deliberately no DistributedSampler.__init__: see the module docstring.
        self._num_replicas_arg, self._rank_arg = check_replica_args(num_replicas, rank)
        self._drop_last = bool(drop_last)
        self._seed = operator.index(seed)
        self._perm: KeyedPermutation | None = None  # the last permutation asked for, reused
        # Where the sampler stands (a Bookmark's fields): epoch, position, the last set_epoch
        # value that took effect, and a set_epoch value no pass has taken up yet.
        self._epoch = 0
        self._pos = 0  # committed position; a running pass adds what its cursor has yielded
        self._cursor: tuple[Any, int, int, int, int] | None = None
        self._epoch_arg: int | None = None
        self._requested_epoch: int | None = None
        self._token = object()  # identifies the pass allowed to advance ``_position``
        self._last_num_replicas: int | None = None
        self._replicas_default: tuple[int, int] | None = None  # see set_replicas

    def _keyed_permutation(self, n: int, epoch: int) -> KeyedPermutation:
        """The keyed permutation of ``range(n)`` for ``epoch``, cached until another one is asked for."""
        perm = self._perm
        if perm is None or perm.epoch != epoch or perm.n != n:
            perm = self._perm = KeyedPermutation(n, self._seed, epoch)
        return perm

    # -- position ------------------------------------------------------------------------------
    @property
    def _position(self) -> int:
        """Global position reached: exact even in the middle of a block of units."""
        cursor = self._cursor
        if cursor is None:
            return self._pos
        block_iter, done_before, block_len, start, stride = cursor
        return start + stride * (done_before + block_len - block_iter.__length_hint__())

    @_position.setter
    def _position(self, value: int) -> None:
        self._pos = value
        self._cursor = None

    # -- subclass interface ----------------------------------------------------------------
    def _epoch_size(self) -> int:
        """Number of units in one epoch's global sequence (the pool size for endless samplers)."""
        raise NotImplementedError

    def _units(self, epoch: int, first: int, stride: int, count: int) -> list[Any]:
        """The units at global positions ``first + stride * k`` for ``k < count``."""
        raise NotImplementedError

    def _identity(self) -> dict[str, Any]:
        """Construction arguments a state must agree with (also written into the state)."""
        raise NotImplementedError

    # -- DistributedSampler-compatible attributes -------------------------------------------
    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        return self._replicas()[0]

    @property
    def rank(self) -> int:  # type: ignore[override]
        return self._replicas()[1]

    @property
    def epoch(self) -> int:  # type: ignore[override]
        return self.bookmark().effective()[0]

    @property
    def seed(self) -> int:  # type: ignore[override]
        return self._seed

    @property
    def drop_last(self) -> bool:  # type: ignore[override]
        return self._drop_last

    @property
    def shuffle(self) -> bool:  # type: ignore[override]
        return self._SHUFFLES

    @property
    def num_samples(self) -> int:  # type: ignore[override]
        return len(self)

    @property
    def total_size(self) -> int:  # type: ignore[override]
        return len(self) * self.num_replicas

    @property
    def dataset(self) -> None:  # type: ignore[override]
        return None

    # -- the shard --------------------------------------------------------------------------------
    def set_replicas(self, num_replicas: int | None, rank: int | None) -> None:
        """Serve shard ``rank`` of ``num_replicas``, unless the constructor was given them.

        The data-parallel size and rank, for runs where they differ from the process group's
        world size and rank (tensor parallelism: the ranks of one tensor-parallel group must see
        the same samples). :class:`~lightning_utils.data.loader.ResumableDataLoader` sets them
        from the trainer that iterates it (``trainer.distributed_sampler_kwargs``); in a plain
        ``DataLoader``, pass ``num_replicas``/``rank`` or call this. ``None, None`` goes back to
        reading ``torch.distributed``. Takes effect at the next pass (and for ``len()``).
        """
        if num_replicas is None and rank is None:
            self._replicas_default = None
            return
        if num_replicas is None or rank is None:
            raise ValueError(f"set_replicas needs both num_replicas and rank, got {num_replicas!r}, {rank!r}")
        check_replica_args(num_replicas, rank)
        self._replicas_default = (operator.index(num_replicas), operator.index(rank))

    def _replicas(self) -> tuple[int, int]:
        """``(num_replicas, rank)``: the constructor's, else :meth:`set_replicas`', else torch.distributed's."""
        return resolve_replicas(self._num_replicas_arg, self._rank_arg, self._replicas_default)

    # -- epochs and passes --------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next pass.

        A different epoch starts that epoch from its beginning when the next iteration starts;
        the same epoch changes nothing, so a restored or partly consumed position is kept
        (Lightning calls ``set_epoch`` with the resumed epoch after restoring a mid-epoch
        checkpoint). "The same" means the value of the previous ``set_epoch`` (saved in the
        state), so a sampler that rolled over into later epochs on its own within one Lightning
        epoch (a short loader cycled by ``CombinedLoader``) keeps its position too. An iterator that is already running is not affected.
        """
        epoch = operator.index(epoch)
        if epoch < 0:
            raise ValueError(f"{type(self).__name__}.set_epoch: epoch must be >= 0, got {epoch}")
        self._requested_epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        plan = self.plan_pass()
        self._epoch, self._position, self._requested_epoch = plan.epoch, plan.start, None
        self._epoch_arg = plan.epoch_arg
        self._last_num_replicas = plan.num_replicas
        token = self._token = object()
        return self._generate(plan, token)

    def _generate(self, plan: Pass, token: object) -> Iterator[Any]:
        stride, start, total = plan.num_replicas, plan.start, plan.length
        done, block = 0, _FIRST_BLOCK
        while total is None or done < total:
            count = block if total is None else min(block, total - done)
            units = self._units(plan.epoch, start + plan.rank + stride * done, stride, count)
            block_iter = iter(units)
            if self._token is token:  # unless a newer pass or a load_state_dict took over
                # The position is read off the list iterator's remaining length: no per-item work.
                self._cursor = (block_iter, done, len(units), start, stride)
            yield from block_iter
            done += len(units)
            block = min(block * 2, _MAX_BLOCK)

    def __len__(self) -> int:
        """Units this rank yields in one whole epoch (constant, also after a mid-epoch restore)."""
        num_replicas = self.num_replicas
        size = self._epoch_size()
        if self._ENDLESS or not self._drop_last:
            return -(-size // num_replicas)
        return size // num_replicas

    def index(self) -> int:
        """Global position reached in the current epoch (all ranks together)."""
        return self.bookmark().effective()[1]

    # -- resume contract -------------------------------------------------------------------------
    def plan_pass(self) -> Pass:
        """The pass the next ``iter()`` will run (pure: changes nothing).

        It starts at :meth:`Bookmark.effective` of :meth:`bookmark`, or at the beginning of the
        next epoch if that epoch has no units left for this shard.
        """
        num_replicas, rank = self._replicas()
        here = self.bookmark()
        epoch, start = here.effective()
        epoch_arg = here.epoch_arg_in_force()
        size = self._epoch_size()
        if self._ENDLESS:
            return Pass(epoch, start, num_replicas, rank, None, size, epoch_arg)
        if self._pass_length(size, start, num_replicas) == 0 and start > 0:
            epoch, start = epoch + 1, 0  # the epoch is used up: roll over
        return Pass(epoch, start, num_replicas, rank, self._pass_length(size, start, num_replicas), size, epoch_arg)

    def _pass_length(self, size: int, start: int, num_replicas: int) -> int:
        remaining = max(0, size - start)
        return remaining // num_replicas if self._drop_last else -(-remaining // num_replicas)

    def state_after(self, plan: Pass, units: int, finished: bool = False) -> dict[str, Any]:
        """The state after this rank consumed ``units`` units of ``plan`` (every rank having
        consumed as many). ``finished``: the pass ran to its end, so the state is at least the
        end of the pass even if ``units`` falls short of it (a partial last batch was dropped)."""
        position = plan.start + plan.num_replicas * units
        if finished and plan.length is not None:
            position = max(position, plan.start + plan.num_replicas * plan.length)
        return self._make_state(plan.epoch, position, plan.num_replicas, plan.epoch_arg)

    def bookmark(self) -> Bookmark:
        """Where the sampler stands now (in a running pass: after the units it has yielded)."""
        return Bookmark(self._epoch, self._position, self._epoch_arg, self._requested_epoch)

    def seek(self, bookmark: Bookmark) -> None:
        """Make ``bookmark`` where the sampler stands: the next pass starts from it.

        A pass that is running keeps yielding its units but no longer moves the position.
        """
        self._epoch, self._position = bookmark.epoch, bookmark.position
        self._epoch_arg, self._requested_epoch = bookmark.epoch_arg, bookmark.requested
        self._token = object()

    def state_at(self, bookmark: Bookmark) -> dict[str, Any]:
        """The state of this sampler standing at ``bookmark`` (``state_dict()`` is
        ``state_at(bookmark())``); the world size recorded is that of its last pass."""
        epoch, position = bookmark.effective()
        return self._make_state(epoch, position, self._last_num_replicas, bookmark.epoch_arg_in_force())

    # -- state ---------------------------------------------------------------------------------
    def _make_state(
        self, epoch: int, position: int, num_replicas: int | None, epoch_arg: int | None = None
    ) -> dict[str, Any]:
        state: dict[str, Any] = {"sampler": self._STATE_NAME, "version": _STATE_VERSION}
        state.update(self._identity())
        state.update({"epoch": epoch, "position": position, "num_replicas": num_replicas, "set_epoch": epoch_arg})
        return state

    def state_dict(self) -> dict[str, Any]:
        """This sampler's own position: what it has yielded so far (a few integers)."""
        return self.state_at(self.bookmark())

    def _check_state(self, state: Any) -> tuple[int, int, int | None]:
        name = self._STATE_NAME
        if not isinstance(state, Mapping):
            raise ValueError(f"{name}.load_state_dict expects a dict, got {type(state).__name__}")
        if "loader" in state and isinstance(state.get("sampler"), Mapping):
            raise ValueError(
                f"{name}.load_state_dict: the state is a {state['loader']} state (the loader's, not the "
                "sampler's); load it with the loader's load_state_dict, or pass its 'sampler' entry"
            )
        other = state.get("sampler")
        if other is not None and other != name:
            raise ValueError(f"{name}.load_state_dict: the state is from a {other}, not a {name}")
        missing = sorted(self._REQUIRED_KEYS - set(state))
        if missing:
            raise ValueError(f"{name}.load_state_dict: the state is missing keys {missing}")
        for key, mine in self._identity().items():
            if key in state and state[key] != mine:
                raise ValueError(
                    f"{name}.load_state_dict: the state has {key}={state[key]!r} but this sampler "
                    f"was built with {key}={mine!r}"
                )
        values = []
        for key, default in (("epoch", 0), ("position", None)):
            value = state.get(key, default)
            try:
                value = operator.index(value)
            except TypeError:
                raise ValueError(f"{name}.load_state_dict: {key} must be an int, got {value!r}") from None
            if value < 0:
                raise ValueError(f"{name}.load_state_dict: {key} must be >= 0, got {value}")
            values.append(value)
        epoch_arg = state.get("set_epoch")
        if epoch_arg is not None:
            try:
                epoch_arg = operator.index(epoch_arg)
            except TypeError:
                raise ValueError(
                    f"{name}.load_state_dict: set_epoch must be an int or None, got {epoch_arg!r}"
                ) from None
        return values[0], values[1], epoch_arg

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``: the remainder of its epoch, then the following epochs.

        Raises ``ValueError`` naming what differs if the state belongs to another sampler
        type, another length / seed / batch layout, or lacks a key.
        """
        epoch, position, epoch_arg = self._check_state(state)
        self._epoch, self._position, self._requested_epoch = epoch, position, None
        self._epoch_arg = epoch_arg
        self._last_num_replicas = state.get("num_replicas")
        self._token = object()

    # Aliases: the same operations under the names ``get_state`` / ``set_state``.
    def get_state(self) -> dict[str, Any]:
        return self.state_dict()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.load_state_dict(state)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._identity().items())
        epoch, position = self.bookmark().effective()
        return f"{type(self).__name__}({args}, epoch={epoch}, position={position})"
