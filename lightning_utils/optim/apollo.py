"""APOLLO and APOLLO-Mini: AdamW-quality training with SGD-like optimizer memory.

What it is for: a :class:`torch.optim.Optimizer` implementing APOLLO (Zhu et al., "APOLLO:
SGD-like Memory, AdamW-level Performance", arXiv 2412.05270, MLSys 2025). For a weight matrix with gradient ``G``, APOLLO keeps
Adam's two moments only for a random low-rank projection ``R`` of ``G`` and uses them to estimate
a per-channel (APOLLO) or per-tensor (APOLLO-Mini, rank 1) learning-rate scale ``s``; the update
is the full-rank gradient times that scale, ``-lr_t * sqrt(scale) * G * s``, with Fira's
norm-growth limiter (the update norm may grow by at most x1.01 per step) and decoupled weight
decay. 0-D/1-D tensors, excluded matrices and groups with ``rank=0`` get AdamW.

What it must never do: store anything but tensors and Python numbers in its state (so
``torch.load(weights_only=True)`` and safetensors checkpoints work), touch the global RNG, make a
projection depend on the device it is drawn on, crash on a parameter shape, or gather a sharded
weight or gradient.

Per-parameter state (tensors and ints only):

- ``step`` (int), ``seed`` (int: the parameter's 1-based index across all groups, counting
  parameters that have no gradient, assigned at its first step);
- ``exp_avg``, ``exp_avg_sq``: Adam moments, in the projected shape ``(m, r)`` or ``(r, n)`` for
  APOLLO parameters and in the parameter's shape for AdamW ones;
- ``scaling_grad`` (0-d tensor): the norm of the last (limited) APOLLO update direction;
- ``projection`` (tensor, ``proj="svd"`` only): the SVD basis, which depends on the gradient.

DTensor parameters (FSDP2's ``fully_shard``, HSDP, tensor parallelism; :mod:`.sharded`) are
updated on each rank's local block, with the same result as on the unsharded tensors up to
float rounding. Their state follows the parameter: ``exp_avg``/``exp_avg_sq`` are DTensors on
the parameter's mesh with the parameter's placements, on the moments' own global shape (for a
``Shard(0)`` parameter, a right projection's ``(m, r)`` moments split their ``m`` rows as the
parameter does, a left projection's ``(r, n)`` moments split their ``r`` rows); ``scaling_grad``
is a plain 0-d tensor, identical on every rank; ``step``/``seed`` are the same ints everywhere.
A checkpoint loader can therefore reslice every state tensor for another world size, and
``load_state_dict`` accepts an unsharded state for sharded parameters (each rank keeps its block).

The random projection is never stored: refresh ``k = step // update_proj_gap`` of a parameter is
regenerated from ``(seed, k)`` on a dedicated CPU generator (:mod:`.projection`) and cached
outside the state until the next refresh, so a resumed run, in a fresh process with any global
RNG state, makes bit-identical next steps, and CPU and CUDA use identical matrices.

Speed: beyond AdamW's elementwise work the step costs the projection matmul, ``r*m*n``
multiply-adds per matrix, which follows torch's float32 matmul settings
(``torch.set_float32_matmul_precision``; this module never changes them). Everything else is
kept near the memory-traffic floor: per parameter, the projected gradient and ``N`` live in a
reused workspace (2x the largest projected gradient per device and dtype, not state), the
channel norms of ``G`` are one read of it, the limiter runs batched over the group as tensor ops
(no host sync), and the update ``p += alpha * G * s`` is one foreach ``addcmul`` per group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, overload

import torch
from torch.optim import Optimizer

from lightning_utils.optim.projection import (
    Side,
    projected_shape,
    projection_seed,
    random_projection,
    svd_projection,
)
from lightning_utils.optim.selection import matrix_shape, uses_apollo
from lightning_utils.optim.sharded import (
    ShardLayout,
    SumReducer,
    is_dtensor,
    local,
    reduce_scatter_rows,
    shard_like,
    state_dtensor,
)

__all__ = ["Apollo", "ApolloMini"]

PROJECTIONS = ("random", "svd")
SCALE_TYPES = ("channel", "tensor")
PROJ_TYPES = ("std", "reverse_std", "left", "right")
# Fira's norm-growth limiter: the update norm may grow by at most this factor per step.
NORM_GROWTH_LIMIT = 1.01
# Keeps the scale and limiter ratios finite for all-zero gradients.
_NORM_EPS = 1e-8
# Row-block size (elements) for column norms of large gradients: cache-sized temporaries.
_CHUNK_ELEMENTS = 1 << 16

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(options: dict[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming the first bad option; normalise betas and exclude_dims."""
    lr = options["lr"]
    if isinstance(lr, torch.Tensor):
        lr = float(lr)
    if not _is_number(lr) or not lr >= 0.0:
        raise ValueError(f"{where}: invalid lr={options['lr']!r}; it must be a number >= 0")
    betas = options["betas"]
    if not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"{where}: invalid betas={betas!r}; expected two numbers in [0, 1)")
    for i, beta in enumerate(betas):
        if not _is_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"{where}: invalid betas[{i}]={beta!r}; it must be in [0, 1)")
    options["betas"] = (float(betas[0]), float(betas[1]))
    for key in ("eps", "weight_decay"):
        if not _is_number(options[key]) or not options[key] >= 0.0:
            raise ValueError(f"{where}: invalid {key}={options[key]!r}; it must be a number >= 0")
    if not isinstance(options["correct_bias"], bool):
        raise ValueError(f"{where}: invalid correct_bias={options['correct_bias']!r}; expected a bool")
    if not _is_int(options["rank"]) or options["rank"] < 0:
        raise ValueError(f"{where}: invalid rank={options['rank']!r}; it must be an int >= 0 (0 means AdamW)")
    for key, allowed in (("proj", PROJECTIONS), ("scale_type", SCALE_TYPES), ("proj_type", PROJ_TYPES)):
        if options[key] not in allowed:
            raise ValueError(f"{where}: unknown {key}={options[key]!r}; expected one of {list(allowed)}")
    if not _is_number(options["scale"]) or not options["scale"] > 0.0:
        raise ValueError(f"{where}: invalid scale={options['scale']!r}; it must be a number > 0")
    if not _is_int(options["update_proj_gap"]) or options["update_proj_gap"] < 1:
        raise ValueError(f"{where}: invalid update_proj_gap={options['update_proj_gap']!r}; it must be an int >= 1")
    if not _is_int(options["min_numel"]) or options["min_numel"] < 0:
        raise ValueError(f"{where}: invalid min_numel={options['min_numel']!r}; it must be an int >= 0")
    dims = options["exclude_dims"]
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or not all(_is_int(d) for d in dims):
        raise ValueError(f"{where}: invalid exclude_dims={dims!r}; expected a list of ints")
    options["exclude_dims"] = tuple(int(d) for d in dims)


def _channel_norms(x: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 norms of the rows (``dim=1``) or columns (``dim=0``) of a 2-D tensor, keepdim."""
    if dim == 1:
        return torch.linalg.vector_norm(x, dim=1, keepdim=True)
    rows = max(1, _CHUNK_ELEMENTS // max(1, x.shape[1]))
    if rows >= x.shape[0]:
        # On CPU, torch's vector_norm over dim 0 is ~10x slower than this (torch 2.13).
        return x.square().sum(dim=0, keepdim=True).sqrt_()
    # Column norms of a large matrix in row blocks: cache-sized temporaries, no full-size one.
    squares = torch.zeros((1, x.shape[1]), dtype=torch.float32, device=x.device)
    for block in x.split(rows):
        squares.add_(block.float().square().sum(dim=0, keepdim=True))
    return squares.sqrt_().to(x.dtype)


def _side(m: int, n: int, proj_type: str) -> Side:
    """Which side of the (m, n) gradient is projected: "right" keeps rows, "left" keeps columns."""
    if proj_type == "right":
        return "right"
    if proj_type == "left":
        return "left"
    tall = m >= n
    if proj_type == "reverse_std":
        tall = not tall
    return "right" if tall else "left"


def _clamped_rank(m: int, n: int, side: Side, group: dict[str, Any]) -> int:
    """The rank actually used: at most the projected dimension, and for an SVD basis at most the
    number of singular vectors, ``min(m, n)``, so no shape is too small for the configured rank."""
    rank = min(group["rank"], n if side == "right" else m)
    if group["proj"] == "svd":
        rank = min(rank, m, n)
    return rank


def _grad(param: torch.Tensor) -> torch.Tensor:
    """The gradient of a parameter that :meth:`Apollo.step` planned to update (it has one)."""
    grad = param.grad
    assert grad is not None, "only parameters with a gradient are planned"
    return grad


def _sharded_grad(param: Any) -> torch.Tensor:
    """The local block of a DTensor parameter's gradient, in the parameter's placements.

    A gradient laid out differently (e.g. ``Partial`` from tensor parallelism) is redistributed
    to the parameter's placements first, as DTensor's own ops would do implicitly.
    """
    grad: Any = _grad(param)
    if not is_dtensor(grad):
        raise RuntimeError(
            f"parameter {tuple(param.shape)} is a DTensor but its gradient is a {type(grad).__name__}; "
            "set DTensor gradients on DTensor parameters"
        )
    if grad.placements != param.placements or (
        grad.device_mesh is not param.device_mesh and grad.device_mesh != param.device_mesh
    ):
        grad = grad.redistribute(param.device_mesh, param.placements)
    return grad.to_local()


class _Planned:
    """One APOLLO parameter of the current step: its state and 2-D geometry (no tensors kept).

    ``layout`` is set for a DTensor parameter: the block of the matrix this rank holds.
    """

    __slots__ = ("layout", "m", "n", "param", "rank", "side", "state")

    def __init__(
        self,
        param: torch.Tensor,
        state: dict[str, Any],
        m: int,
        n: int,
        side: Side,
        rank: int,
        layout: ShardLayout | None = None,
    ) -> None:
        self.param, self.state, self.m, self.n, self.side, self.rank = param, state, m, n, side, rank
        self.layout = layout


class Apollo(Optimizer):
    r"""APOLLO: structured learning-rate scaling from a low-rank Adam state.

    For each parameter treated as a matrix ``G`` of shape ``(m, n)`` (see
    :mod:`lightning_utils.optim.selection` for which ones), with ``t`` the step count:

    1. ``R = G @ P.T`` (shape ``(m, r)``, "right") or ``R = P.T @ G`` (``(r, n)``, "left"),
       ``P`` random N(0, 1/r), redrawn every ``update_proj_gap`` steps (or the top-``r``
       singular vectors of ``G`` with ``proj="svd"``). ``proj_type="std"`` projects the
       longer side away: "right" when ``m >= n``; ``"reverse_std"`` swaps; ``"left"``/``"right"``
       force a side. The rank is clamped to the projected dimension (for ``"svd"`` also to
       ``min(m, n)``, the number of singular vectors), so no shape is too small.
    2. Adam on ``R``: ``M = b1 M + (1 - b1) R``, ``V = b2 V + (1 - b2) R**2``,
       ``N = M / (sqrt(V) + eps)`` (eps after the sqrt, moments not bias-corrected).
    3. Scale ``s``: ``scale_type="channel"`` gives one factor per kept channel (a row for "right",
       a column for "left"), ``||N_c|| / (||R_c|| + 1e-8)``; ``"tensor"`` gives one factor,
       ``||N||_F / (||R||_F + 1e-8)``.
    4. ``U = G * s``; limiter: from the second step, ``U /= max(||U|| / ||U_prev||, 1.01) / 1.01``.
    5. ``p -= lr_t * sqrt(scale) * U`` with ``lr_t = lr * sqrt(1 - b2**t) / (1 - b1**t)`` when
       ``correct_bias`` (else ``lr``); then ``p *= 1 - lr * weight_decay`` (decoupled).

    AdamW parameters use steps 2 and 5 on the full gradient, without ``sqrt(scale)`` (exactly
    what a ``rank=0`` group does), batched with foreach ops.

    DTensor parameters get the same update, computed on each rank's block (see the module
    docstring for their state). Per mesh dimension the placement may be ``Replicate()``,
    ``Shard(0)`` or, for 2-D parameters, ``Shard(1)``; a matrix projected on the side its mesh
    shards (``Shard(0)`` with a left projection, i.e. ``m < n`` under ``proj_type="std"``)
    reduce-scatters its ``(r, n)`` projected gradient, otherwise only norms cross ranks
    (``proj_type="right"`` keeps every ``Shard(0)`` matrix that way). Other placements, and
    ``proj="svd"`` on a sharded matrix, raise ``ValueError`` naming the parameter. Every constructor option is also a
    param-group key, so groups may differ (e.g. ``{"params": norms, "rank": 0}``). Parameters may
    be given as a flat iterable, as groups, or as ``(name, tensor)`` pairs.

    Args:
        params: parameters or param groups.
        lr: learning rate (>= 0).
        betas: Adam coefficients, each in [0, 1).
        eps: added to ``sqrt(V)`` (>= 0).
        weight_decay: decoupled weight decay (>= 0), applied after the update.
        correct_bias: Adam bias correction folded into the step size.
        rank: projection rank; 0 makes the group plain AdamW.
        proj: ``"random"`` (APOLLO) or ``"svd"`` (GaLore-style basis, kept in state).
        scale_type: ``"channel"`` (APOLLO) or ``"tensor"`` (APOLLO-Mini).
        scale: update multiplier; enters as ``sqrt(scale)`` (APOLLO-Mini uses 128).
        update_proj_gap: steps between projection refreshes.
        proj_type: ``"std"``, ``"reverse_std"``, ``"left"`` or ``"right"`` (see step 1).
        min_numel: matrices with fewer elements use AdamW.
        exclude_dims: matrices with any of these sizes as a dimension use AdamW (e.g. the
            vocabulary size, to keep embeddings and the LM head on AdamW from YAML).

    Raises:
        ValueError: for a bad option, naming it (and the param group, if that is where it is),
            for a complex parameter (optimize ``torch.view_as_real(p)`` instead), or for a
            DTensor parameter whose placements the low-rank update cannot use.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        rank: int = 256,
        proj: str = "random",
        scale_type: str = "channel",
        scale: float = 1.0,
        update_proj_gap: int = 200,
        proj_type: str = "std",
        min_numel: int = 0,
        exclude_dims: Sequence[int] = (),
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
            "rank": rank,
            "proj": proj,
            "scale_type": scale_type,
            "scale": scale,
            "update_proj_gap": update_proj_gap,
            "proj_type": proj_type,
            "min_numel": min_numel,
            "exclude_dims": exclude_dims,
        }
        _validate(defaults, type(self).__name__)
        # Random projections cached until their next refresh; rebuilt from (seed, step) on demand,
        # never saved. Keyed by parameter.
        self._projections: dict[torch.Tensor, tuple[tuple[Any, ...], torch.Tensor]] = {}
        # Reused per-step workspace (see _scratch_pair); not state.
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        # The local block of each DTensor parameter (ShardLayout); derived, never saved.
        self._layouts: dict[torch.Tensor, ShardLayout] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"{type(self).__name__} param group {len(self.param_groups) - 1}"
        try:
            _validate(group, where)
            first = sum(len(g["params"]) for g in self.param_groups[:-1])
            for i, param in enumerate(group["params"]):
                if param.is_complex():
                    raise ValueError(
                        f"{where}: parameter {i} is complex ({param.dtype}); complex parameters are not "
                        "supported (optimize torch.view_as_real(param) instead)"
                    )
                if is_dtensor(param):  # an unsupported placement fails here, not at the first step
                    shape = matrix_shape(param.shape) if self.uses_projection(param, group) else None
                    self._layout(param, shape, group, i, first + i + 1)
        except ValueError:
            self.param_groups.pop()  # a rejected group must not stay in the optimizer
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._projections = {}
        self._scratch = {}
        self._layouts = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :class:`Apollo` (or :class:`ApolloMini`).

        Everything is checked before anything changes: the saved group options (options missing
        from an older state dict are taken from this optimizer's groups), that each parameter's
        state was written by Apollo, and that its moments have the shape its options give. A
        mismatch raises ``ValueError`` naming the parameter (1-based, across groups) and leaves
        the optimizer as it was. Group count and sizes are checked by torch, also up front.
        """
        name = type(self).__name__
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            super().load_state_dict(state_dict)  # torch's own ValueError, before any change
            return
        merged_groups = []
        index = 0
        for i, (saved, current) in enumerate(zip(saved_groups, self.param_groups)):
            merged = {key: value for key, value in current.items() if key not in ("params", "param_names")}
            merged.update(saved)
            _validate(merged, f"{name}.load_state_dict: saved param group {i}")
            merged_groups.append(merged)
            for saved_id, param in zip(saved["params"], current["params"]):
                index += 1
                state = state_dict["state"].get(saved_id)
                if state is None:
                    continue
                self._check_saved_state(index, param, state, merged)
        super().load_state_dict({**state_dict, "param_groups": merged_groups})
        self._projections.clear()
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if state and is_dtensor(param):
                    for key in ("exp_avg", "exp_avg_sq"):
                        if torch.is_tensor(state.get(key)) and not is_dtensor(state[key]):
                            # an unsharded state (one process, or gathered): keep this rank's block
                            state[key] = shard_like(state[key], param)

    def _check_saved_state(self, index: int, param: torch.Tensor, state: Any, group: dict[str, Any]) -> None:
        where = f"{type(self).__name__}.load_state_dict: parameter #{index} {tuple(param.shape)}"
        if not isinstance(state, dict) or not all(_is_int(state.get(key)) for key in ("step", "seed")):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"{where}: saved state {keys} lacks the int 'step' and 'seed' that Apollo writes; "
                "was this state dict saved by another optimizer?"
            )
        for key in ("exp_avg", "exp_avg_sq"):
            value = state.get(key)
            if value is None:
                continue
            expected = self._moment_shape(param, group)
            if not torch.is_tensor(value) or tuple(value.shape) != expected:
                got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(
                    f"{where}: saved {key} has shape {got}, but the saved group options expect {expected} "
                    "for this parameter; the state dict belongs to a different model or parameter order"
                )

    def uses_projection(self, param: torch.Tensor, group: dict[str, Any] | None = None) -> bool:
        """Whether ``param`` gets the APOLLO update (else AdamW) under its group's options."""
        if group is None:
            group = next((g for g in self.param_groups if any(p is param for p in g["params"])), None)
            if group is None:
                raise ValueError("uses_projection: the tensor is not a parameter of this optimizer")
        return uses_apollo(
            param.shape, rank=group["rank"], min_numel=group["min_numel"], exclude_dims=group["exclude_dims"]
        )

    def _moment_shape(self, param: torch.Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        """Shape of the Adam moments of ``param``: projected for APOLLO, the param's for AdamW."""
        if not self.uses_projection(param, group):
            return tuple(param.shape)
        shape = matrix_shape(param.shape)
        assert shape is not None  # uses_apollo() admits only >= 2-D tensors
        m, n = shape
        side = _side(m, n, group["proj_type"])
        return projected_shape((m, n), side, _clamped_rank(m, n, side, group))

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss.

        Every parameter is checked (sparse gradient, moments that no longer fit the options)
        before any is updated, so a failing step changes no parameter.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = []
        index = 0  # a new parameter's seed: its 1-based index across groups, gradient-less params counted
        for group in self.param_groups:
            apollo: list[_Planned] = []
            adamw: list[torch.Tensor] = []
            sharded_apollo: list[_Planned] = []
            sharded_adamw: list[torch.Tensor] = []
            for position, param in enumerate(group["params"]):
                index += 1
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                sharded = is_dtensor(param)
                shape = matrix_shape(param.shape) if self.uses_projection(param, group) else None
                layout = None
                if sharded:
                    layout = self._layout(param, shape, group, position, index)
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["seed"] = index
                item = None
                expected = tuple(param.shape)
                if shape is not None:
                    m, n = shape
                    side = _side(m, n, group["proj_type"])
                    item = _Planned(param, state, m, n, side, _clamped_rank(m, n, side, group), layout)
                    expected = projected_shape((m, n), side, item.rank)
                exp_avg = state.get("exp_avg")
                if exp_avg is not None and tuple(exp_avg.shape) != expected:
                    raise RuntimeError(
                        f"{type(self).__name__}: parameter #{state['seed']} has moments of shape "
                        f"{tuple(exp_avg.shape)} but its group options now give {expected}; rank, proj, "
                        "proj_type or the exclusion rule changed after the state was created"
                    )
                if item is None:
                    (sharded_adamw if sharded else adamw).append(param)
                else:
                    (sharded_apollo if sharded else apollo).append(item)
            plans.append((group, apollo, adamw, sharded_apollo, sharded_adamw))
        for group, apollo, adamw, sharded_apollo, sharded_adamw in plans:
            if apollo:
                self._apollo_update(apollo, group)
            if adamw:
                self._adamw_update(adamw, group)
            if sharded_apollo:
                self._apollo_update_sharded(sharded_apollo, group)
            if sharded_adamw:
                self._adamw_update(sharded_adamw, group, sharded=True)
        return loss

    def _layout(
        self, param: Any, shape: tuple[int, int] | None, group: dict[str, Any], position: int, index: int
    ) -> ShardLayout | None:
        """The local block of a DTensor parameter that gets APOLLO (``shape`` is its matrix
        shape), cached per parameter; checks that an AdamW-routed one (``shape`` None) is not
        ``Partial``. Raises ``ValueError`` naming the parameter and its placements."""
        names = group.get("param_names")
        name = repr(names[position]) if names and position < len(names) else f"#{index}"
        if shape is None:
            if any(p.is_partial() for p in param.placements):
                raise ValueError(
                    f"{type(self).__name__}: parameter {name} {tuple(param.shape)} has placements "
                    f"{tuple(param.placements)}; a Partial parameter holds no values to update elementwise "
                    "(redistribute it to Replicate or Shard first)"
                )
            return None
        cached = self._layouts.get(param)
        if cached is not None and cached.mesh is param.device_mesh and cached.placements == tuple(param.placements):
            layout = cached
        else:
            try:
                layout = ShardLayout(param, shape[0], shape[1], name)
            except ValueError as error:
                raise ValueError(f"{type(self).__name__}: {error}") from None
            self._layouts[param] = layout
        if group["proj"] == "svd" and layout.sharded:
            raise ValueError(
                f"{type(self).__name__}: parameter {name} {tuple(param.shape)} with placements "
                f"{layout.placements}: proj='svd' needs the whole gradient of a matrix, which a sharded "
                "parameter never gathers; use proj='random' (the default) for sharded parameters"
            )
        return layout

    def _step_size(self, group: dict[str, Any], step: int) -> float:
        lr = float(group["lr"])
        if not group["correct_bias"]:
            return lr
        beta1, beta2 = group["betas"]
        return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)

    def _projection(self, item: _Planned, group: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        state, m, n, side, rank = item.state, item.m, item.n, item.side, item.rank
        refresh = state["step"] // group["update_proj_gap"]
        size = (rank, n) if side == "right" else (m, rank)
        if group["proj"] == "svd":
            basis = state.get("projection")
            if basis is None or state["step"] % group["update_proj_gap"] == 0 or tuple(basis.shape) != size:
                basis = svd_projection(grad, side, rank)
                state["projection"] = basis
            return basis
        layout = item.layout
        if layout is not None and layout.sharded:
            return self._projection_block(item, refresh, size, layout, grad)
        key = (state["seed"], refresh, size, grad.device, grad.dtype)
        cached = self._projections.get(item.param)
        if cached is not None and cached[0] == key:
            return cached[1]
        matrix = random_projection(
            (m, n), side, rank, projection_seed(state["seed"], refresh), device=grad.device, dtype=grad.dtype
        )
        self._projections[item.param] = (key, matrix)
        return matrix

    def _projection_block(
        self, item: _Planned, refresh: int, size: tuple[int, int], layout: ShardLayout, grad: torch.Tensor
    ) -> torch.Tensor:
        """This rank's block of the random projection of a sharded parameter: the columns of
        ``P`` (r, n) it holds for a right projection, the rows of ``P`` (m, r) for a left one.

        The whole matrix is drawn exactly as for an unsharded parameter (same seed, same CPU
        generator, so every rank draws the same values) and only the block is kept.
        """
        bounds = layout.cols if item.side == "right" else layout.rows
        key = (item.state["seed"], refresh, size, bounds, grad.device, grad.dtype)
        cached = self._projections.get(item.param)
        if cached is not None and cached[0] == key:
            return cached[1]
        seed = projection_seed(item.state["seed"], refresh)
        matrix = random_projection((item.m, item.n), item.side, item.rank, seed)
        block = matrix[:, bounds[0] : bounds[1]] if item.side == "right" else matrix[bounds[0] : bounds[1]]
        block = block.to(device=grad.device, dtype=grad.dtype).contiguous()
        self._projections[item.param] = (key, block)
        return block

    def _apollo_update(self, items: list[_Planned], group: dict[str, Any]) -> None:
        """APOLLO for one group's projected params.

        Per parameter, while its projected gradient is hot in cache: the projection matmul, the
        Adam moments and the scale ``s`` (a vector of ``m`` or ``n`` numbers, or one number) and
        the update norm. Then, batched over the group, the limiter (no host sync) and the update
        ``p += alpha * G * s``. Temporaries stay one parameter's projected size.
        """
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        channel = group["scale_type"] == "channel"
        grads, factors, update_norms = [], [], []
        for item in items:
            state = item.state
            grad = _grad(item.param)
            if grad.dim() != 2:
                grad = grad.reshape(item.m, item.n)
            proj = self._projection(item, group, grad)
            shape = projected_shape((item.m, item.n), item.side, item.rank)
            low, normed = self._scratch_pair(shape, grad)
            # The one essential cost beyond AdamW's: r*m*n multiply-adds. A transposed operand
            # costs BLAS nothing, so the matrix stays in the layout it is drawn in.
            if item.side == "right":
                torch.mm(grad, proj.t(), out=low)
            else:
                torch.mm(proj.t(), grad, out=low)
            exp_avg = state.get("exp_avg")
            if exp_avg is None:
                exp_avg = state["exp_avg"] = torch.zeros_like(low)
                state["exp_avg_sq"] = torch.zeros_like(low)
            exp_avg_sq = state["exp_avg_sq"]
            state["step"] += 1

            # Adam on the projected gradient R: M <- b1 M + (1 - b1) R, V <- b2 V + (1 - b2) R^2,
            # N = M / (sqrt(V) + eps). Moments are not bias-corrected; the step size is.
            exp_avg.lerp_(low, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
            torch.sqrt(exp_avg_sq, out=normed).add_(eps)
            torch.div(exp_avg, normed, out=normed)

            # Scale s = ||N_c|| / (||R_c|| + 1e-8) per kept channel (rows for "right", columns
            # for "left") or per tensor, and the update norm ||G * s|| from the gradient's channel
            # norms: no full-size temporary.
            if channel:
                dim = 1 if item.side == "right" else 0
                factor = _channel_norms(normed, dim)
                factor.div_(_channel_norms(low, dim).add_(_NORM_EPS))
                grad_norms = _channel_norms(grad, dim)
                update_norm = torch.linalg.vector_norm(grad_norms.mul_(factor))
            else:
                factor = torch.linalg.vector_norm(normed)
                factor.div_(torch.linalg.vector_norm(low).add_(_NORM_EPS))
                update_norm = torch.linalg.vector_norm(grad).mul_(factor)
            grads.append(grad)
            factors.append(factor)
            update_norms.append(update_norm)

        self._limit_norm_growth(items, factors, update_norms)

        self._descend(group, items, [item.param for item in items], grads, factors)

    def _descend(
        self,
        group: dict[str, Any],
        items: list[_Planned],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        factors: list[torch.Tensor],
    ) -> None:
        """p <- p - lr_t * sqrt(scale) * G * s, then decoupled weight decay p <- p * (1 - lr * wd).

        ``params`` are the tensors updated in place (each rank's local block of a DTensor), ``grads``
        their gradients viewed as matrices, ``factors`` the scales ``s``."""
        root_scale = math.sqrt(group["scale"])
        views, view_grads, view_factors, alphas = [], [], [], []
        for item, param, grad, factor in zip(items, params, grads, factors):
            alpha = -self._step_size(group, item.state["step"]) * root_scale
            if param.is_contiguous():
                views.append(param.view(grad.shape))
                view_grads.append(grad)
                view_factors.append(factor)
                alphas.append(alpha)
            else:
                param.add_((grad * factor).reshape(param.shape), alpha=alpha)
        if views:
            torch._foreach_addcmul_(views, view_grads, view_factors, alphas)
        if group["weight_decay"] > 0.0:
            torch._foreach_mul_(params, 1.0 - float(group["lr"]) * group["weight_decay"])

    def _apollo_update_sharded(self, items: list[_Planned], group: dict[str, Any]) -> None:
        """APOLLO for one group's DTensor params, on each rank's local block of each matrix.

        The math is :meth:`_apollo_update`'s; what differs is where the sums run. For a right
        projection ``R = G @ P.T`` (``P`` is ``(r, n)``) the rows of ``G`` stay local: a rank
        computes its rows of ``R`` from its block of ``G`` and its columns of ``P``; for a left
        projection ``R = P.T @ G`` the sum runs over the rows, so each rank's ``P_rows.T @ G_rows``
        is a partial sum. A partial ``R`` (r rows) is reduce-scattered over the mesh dimension
        that shards the projected side, leaving each rank a chunk of ``R``'s ``r`` dimension:
        the moments then have the parameter's own placements on the ``(m, r)`` or ``(r, n)``
        shape. The scale and the limiter need sums of squares over the projected side (per
        channel or per tensor) and over the kept side (the update norm): they are all-reduced,
        as a few floats per channel, batched over the group (at most two rounds per step, one
        when each matrix is split along one side only, as under FSDP2). Every rank holds the
        same factors and norms for its block, so the limiter and the update are local.
        """
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        channel = group["scale_type"] == "channel"
        grads: list[torch.Tensor] = []
        lows: list[torch.Tensor] = []
        scatters: dict[tuple[Any, int, int], list[int]] = {}  # (group, size, index) -> items
        for i, item in enumerate(items):
            layout = item.layout
            assert layout is not None
            grad = _sharded_grad(item.param).reshape(layout.shape)
            proj = self._projection(item, group, grad)
            if item.side == "right":
                low, over = torch.mm(grad, proj.t()), layout.col_dim
            else:
                low, over = torch.mm(proj.t(), grad), layout.row_dim
            grads.append(grad)
            lows.append(low)
            if over is not None:  # a partial sum: reduce-scatter its r dimension over that mesh dim
                scatters.setdefault(layout.axes[over], []).append(i)
        for axis, indices in scatters.items():
            rows_first = [lows[i] if items[i].side == "left" else lows[i].t() for i in indices]
            for i, chunk in zip(indices, reduce_scatter_rows(rows_first, axis)):
                lows[i] = chunk if items[i].side == "left" else chunk.t()

        reducer = SumReducer()
        stats: list[torch.Tensor] = []
        deferred: list[int] = []
        scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # item -> (s, squared update norm)
        for i, item in enumerate(items):
            layout, state, low = item.layout, item.state, lows[i]
            assert layout is not None
            if "exp_avg" not in state:
                shape = projected_shape((item.m, item.n), item.side, item.rank)
                for key in ("exp_avg", "exp_avg_sq"):
                    zeros = torch.zeros(low.shape, dtype=low.dtype, device=low.device)
                    state[key] = state_dtensor(zeros, layout, shape)
            exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
            state["step"] += 1
            exp_avg.lerp_(low, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
            normed = torch.sqrt(exp_avg_sq).add_(eps)
            torch.div(exp_avg, normed, out=normed)
            # Sums of squares in float32 (they cross ranks): of N and R over the projected side
            # and of G, per kept channel or over the whole block.
            if channel:
                dim = 1 if item.side == "right" else 0
                stat = torch.stack(
                    [_channel_norms(x, dim).float().square_() for x in (normed, low, grads[i])]
                )  # (3, rows, 1) or (3, 1, cols)
                over = layout.col_dim if item.side == "right" else layout.row_dim
                dims: tuple[int, ...] = () if over is None else (over,)
            else:
                stat = torch.stack([torch.linalg.vector_norm(x).float().square() for x in (normed, low, grads[i])])
                dims = tuple(d for d in (layout.row_dim, layout.col_dim) if d is not None)
            stats.append(stat)
            if dims:
                reducer.add(stat, tuple(layout.axes[d][0] for d in dims))
                deferred.append(i)
            else:
                scales[i] = self._sharded_scale(item, stat, channel, reducer)
        reducer.flush()
        for i in deferred:
            scales[i] = self._sharded_scale(items[i], stats[i], channel, reducer)
        reducer.flush()
        factors = [scales[i][0].to(grad.dtype) for i, grad in enumerate(grads)]
        update_norms = [scales[i][1].sqrt().to(grad.dtype) for i, grad in enumerate(grads)]

        self._limit_norm_growth(items, factors, update_norms)

        self._descend(group, items, [local(item.param) for item in items], grads, factors)

    @staticmethod
    def _sharded_scale(
        item: _Planned, stat: torch.Tensor, channel: bool, reducer: SumReducer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale ``s`` of a sharded matrix from its summed squares (``stat``: N, R, G) and the
        squared norm of its update ``G * s``; a partial sum of that norm over the kept side is
        queued on ``reducer`` (and complete once it is flushed)."""
        factor = stat[0].sqrt().div_(stat[1].sqrt().add_(_NORM_EPS))
        if not channel:
            return factor, stat[2].mul(factor.square())
        update_sq = stat[2].mul(factor.square()).sum()
        layout = item.layout
        assert layout is not None
        kept = layout.row_dim if item.side == "right" else layout.col_dim
        reducer.add(update_sq, () if kept is None else (layout.axes[kept][0],))
        return factor, update_sq

    def _scratch_pair(self, shape: tuple[int, int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two ``shape`` views of a reused buffer for the projected gradient and ``N``.

        Allocating them afresh each step costs more than the arithmetic on them on CPU (large
        allocations are fresh pages); the buffer (2x the largest projected gradient per device
        and dtype) is not optimizer state and is never saved.
        """
        numel = shape[0] * shape[1]
        key = (like.device, like.dtype)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < 2 * numel:
            buffer = torch.empty(2 * numel, device=like.device, dtype=like.dtype)
            self._scratch[key] = buffer
        return buffer[:numel].view(shape), buffer[numel : 2 * numel].view(shape)

    @staticmethod
    def _limit_norm_growth(
        items: list[_Planned], factors: list[torch.Tensor], update_norms: list[torch.Tensor]
    ) -> None:
        """Fira's limiter: from a parameter's second step on, its update norm grows by at most
        x1.01 per step. Divides ``factors`` in place and stores the limited norms; vectorised
        over the group (per device and dtype), with no host sync."""
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, item in enumerate(items):
            if "scaling_grad" in item.state:
                buckets.setdefault((update_norms[i].device, update_norms[i].dtype), []).append(i)
            else:
                item.state["scaling_grad"] = update_norms[i]  # the first step is not limited
        for limited in buckets.values():
            previous = [items[i].state["scaling_grad"] for i in limited]
            norms = torch.stack([update_norms[i] for i in limited])
            limiters = torch.div(norms, torch.stack(previous).to(norms.dtype).add_(_NORM_EPS))
            limiters.clamp_min_(NORM_GROWTH_LIMIT).div_(NORM_GROWTH_LIMIT)
            per_param = list(limiters.unbind())
            torch._foreach_div_([factors[i] for i in limited], per_param)
            torch._foreach_copy_(previous, list(norms.div_(limiters).unbind()))

    def _adamw_update(self, params: list[torch.Tensor], group: dict[str, Any], sharded: bool = False) -> None:
        """AdamW for the non-projected params of one group, batched with foreach ops.

        ``sharded``: the params are DTensors; the ops run on their local shards (elementwise, so
        every placement but ``Partial`` works without communication) and the moments are
        DTensors with the parameter's placements.
        """
        buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for param in params:
            state = self.state[param]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["step"] += 1
            buckets.setdefault((param.device, param.dtype), []).append(param)
        beta1, beta2 = group["betas"]
        for bucket in buckets.values():
            grads = [_grad(p) for p in bucket]
            exp_avgs = [self.state[p]["exp_avg"] for p in bucket]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in bucket]
            tensors = bucket
            if sharded:
                tensors = [local(p) for p in bucket]
                grads = [_sharded_grad(p) for p in bucket]
                exp_avgs = [local(t) for t in exp_avgs]
                exp_avg_sqs = [local(t) for t in exp_avg_sqs]
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denoms, group["eps"])
            step_sizes = [-self._step_size(group, self.state[p]["step"]) for p in bucket]
            torch._foreach_addcdiv_(tensors, exp_avgs, denoms, step_sizes)
            if group["weight_decay"] > 0.0:
                torch._foreach_mul_(tensors, 1.0 - float(group["lr"]) * group["weight_decay"])


class ApolloMini(Apollo):
    """APOLLO-Mini: :class:`Apollo` preset with ``rank=1``, ``scale_type="tensor"``, ``scale=128``.

    One scalar learning-rate scale per matrix from a rank-1 projection: optimizer state is two
    vectors of length ``max(m, n)`` per matrix, i.e. about SGD's memory. All options of
    :class:`Apollo` are accepted and may be overridden.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        rank: int = 1,
        proj: str = "random",
        scale_type: str = "tensor",
        scale: float = 128.0,
        update_proj_gap: int = 200,
        proj_type: str = "std",
        min_numel: int = 0,
        exclude_dims: Sequence[int] = (),
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            rank=rank,
            proj=proj,
            scale_type=scale_type,
            scale=scale,
            update_proj_gap=update_proj_gap,
            proj_type=proj_type,
            min_numel=min_numel,
            exclude_dims=exclude_dims,
        )
