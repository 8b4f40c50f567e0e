"""Which parameters get APOLLO's low-rank treatment, and which get plain AdamW.

What it is for: one documented rule, used by :class:`~lightning_utils.optim.Apollo` itself, plus
a helper that builds param groups from parameter *names*. LightningCLI's automatic
``configure_optimizers`` hands the optimizer a flat list of parameters with no names, so the rule that works from YAML is a rule on shapes, expressed by the
optimizer's own options ``min_numel`` and ``exclude_dims``; the name-based helper is for
``configure_optimizers`` and for LightningCLI's ``OptimizerCallable`` injection.

The shape rule (:func:`uses_apollo`): a parameter is projected when its group's ``rank > 0``,
it has at least 2 dimensions, at least ``min_numel`` elements, and none of its dimensions is
listed in ``exclude_dims``. Tensors with 3 or more dimensions (convolutions) are treated as the
matrix ``(shape[0], prod(shape[1:]))``, i.e. one channel per output feature. Everything else
(biases, norm weights, scalars, excluded matrices) is updated by AdamW with the same betas, eps,
bias correction and decoupled weight decay.

Typical YAML, keeping embeddings and the LM head (both have the vocabulary size as a dimension)
and small matrices on AdamW::

    optimizer:
      class_path: lightning_utils.optim.ApolloMini
      init_args:
        lr: 0.01
        exclude_dims: [1024]     # the vocabulary size
        min_numel: 16384

What it must never do: silently ignore a name pattern that matches nothing (a typo would
quietly train everything with AdamW), or put one parameter in two groups.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["apollo_param_groups", "matrix_shape", "uses_apollo"]


def matrix_shape(shape: Sequence[int]) -> tuple[int, int] | None:
    """The 2-D shape APOLLO treats a parameter as, or ``None`` for 0-D and 1-D tensors.

    ``(m, n)`` stays ``(m, n)``; ``(out, in, k1, k2, ...)`` becomes ``(out, in * k1 * k2 * ...)``.
    """
    if len(shape) < 2:
        return None
    return int(shape[0]), int(math.prod(shape[1:]))


def uses_apollo(shape: Sequence[int], *, rank: int, min_numel: int = 0, exclude_dims: Iterable[int] = ()) -> bool:
    """Whether a parameter of ``shape`` is projected under these group options (see module doc)."""
    if rank <= 0 or len(shape) < 2:
        return False
    if math.prod(shape) < min_numel:
        return False
    excluded = {int(d) for d in exclude_dims}
    return not any(int(d) in excluded for d in shape)


def apollo_param_groups(
    named_parameters: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]],
    *,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    apollo_options: Mapping[str, Any] | None = None,
    adamw_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Split parameters into an APOLLO group and an AdamW (``rank=0``) group by name.

    Args:
        named_parameters: a module, or ``module.named_parameters()``. Frozen parameters
            (``requires_grad=False``) are left out.
        include: ``fnmatch`` patterns (``"blocks.*.attn.*"``); a parameter with 2 or more
            dimensions whose name matches one of them gets APOLLO.
        exclude: patterns that win over ``include`` (e.g. ``"*embed*"``, ``"lm_head.*"``).
        apollo_options: extra keys for the APOLLO group (``rank``, ``scale``, ``lr``...).
        adamw_options: extra keys for the AdamW group (e.g. ``{"weight_decay": 0.0}``).

    Returns:
        A list of at most two param-group dicts for :class:`~lightning_utils.optim.Apollo`
        (empty groups are dropped). Each group carries torch's ``"param_names"`` list.

    Raises:
        ValueError: when a pattern in ``include`` or ``exclude`` matches no parameter name,
            naming the pattern, or when the parameters are not ``(name, tensor)`` pairs.
    """
    if isinstance(named_parameters, torch.nn.Module):
        named_parameters = named_parameters.named_parameters()
    if isinstance(include, str):
        include = (include,)
    if isinstance(exclude, str):
        exclude = (exclude,)
    apollo_opts = dict(apollo_options or {})
    adamw_opts = dict(adamw_options or {})
    for key in ("params", "param_names"):
        if key in apollo_opts or key in adamw_opts:
            raise ValueError(f"apollo_options/adamw_options must not set {key!r}")
    adamw_opts["rank"] = 0

    used: dict[str, bool] = dict.fromkeys((*include, *exclude), False)
    apollo_params: list[torch.nn.Parameter] = []
    apollo_names: list[str] = []
    adamw_params: list[torch.nn.Parameter] = []
    adamw_names: list[str] = []
    seen: set[int] = set()
    for item in named_parameters:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(
                "named_parameters: expected a Module or (name, parameter) pairs such as "
                f"module.named_parameters(), got an item of type {type(item).__name__}"
            )
        name, param = item
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        included = [p for p in include if fnmatch.fnmatchcase(name, p)]
        excluded = [p for p in exclude if fnmatch.fnmatchcase(name, p)]
        for pattern in (*included, *excluded):
            used[pattern] = True
        if included and not excluded and param.ndim >= 2:
            apollo_params.append(param)
            apollo_names.append(name)
        else:
            adamw_params.append(param)
            adamw_names.append(name)
    unused = [pattern for pattern, hit in used.items() if not hit]
    if unused:
        raise ValueError(f"apollo_param_groups: pattern(s) {unused} match no parameter name")
    groups = []
    if apollo_params:
        groups.append({"params": apollo_params, "param_names": apollo_names, **apollo_opts})
    if adamw_params:
        groups.append({"params": adamw_params, "param_names": adamw_names, **adamw_opts})
    return groups
