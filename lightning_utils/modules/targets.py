"""Which submodules a module callback acts on: a target (class or predicate) plus a name policy.

Shared by ``ActivationOffload``, ``ReplaceModules`` and ``CompileModules`` so the three read
their ``target`` / ``include`` / ``exclude`` arguments the same way.

* ``target`` is a module class, a tuple/list of classes, an import path string such as
  ``"torch.nn.Linear"`` (so LightningCLI YAML can name it), or a predicate
  ``(qualified_name, module) -> bool``.
* A name policy is ``None`` (everything passes), or a list of patterns. A pattern matches a
  qualified name (``"model.layers.3.mlp"``) when it is equal to it, is a dotted prefix of it
  (``"model"`` matches everything under ``model.``), or is a shell glob matching it
  (``"*.attn"``, ``"model.layers.[0-3].*"``). ``exclude`` is checked before ``include``; an
  empty ``include`` list lets nothing through.

This module only selects; it must never change a module.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Iterable, Iterator, Sequence

from torch import nn

Predicate = Callable[[str, nn.Module], bool]
Target = type | str | Sequence[type | str] | Predicate

__all__ = ["Predicate", "Target", "describe_target", "find_targets", "passes_policy", "resolve_target"]


def _import_class(path: str, argument: str) -> type:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"`{argument}`: {path!r} is not an import path like 'torch.nn.Linear'")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"`{argument}`: cannot import {path!r}: {err}") from err
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise TypeError(f"`{argument}`: {path!r} is not an nn.Module class")
    return obj


def resolve_target(target: Target | None, argument: str = "target") -> Predicate:
    """Turn a class, classes, import path(s) or predicate into a ``(name, module) -> bool``.

    Anything else (``None`` included) is a ``TypeError`` naming ``argument``.
    """
    if isinstance(target, str):
        target = (target,)
    if isinstance(target, type):
        target = (target,)
    if isinstance(target, (tuple, list)):
        if not target:
            raise ValueError(f"`{argument}` is an empty sequence; name at least one module class")
        classes = []
        for item in target:
            cls = _import_class(item, argument) if isinstance(item, str) else item
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise TypeError(f"`{argument}` must hold nn.Module classes, got {item!r}")
            classes.append(cls)
        class_tuple = tuple(classes)

        def is_instance(name: str, module: nn.Module) -> bool:
            return isinstance(module, class_tuple)

        is_instance.__qualname__ = f"isinstance(*, {tuple(c.__name__ for c in class_tuple)})"
        return is_instance
    if callable(target):
        return target
    raise TypeError(
        f"`{argument}` must be an nn.Module class, a tuple of classes, an import path or a "
        f"predicate (name, module) -> bool; got {type(target).__name__}"
    )


def describe_target(target: Target | None) -> str:
    """``target`` as a message names it: a class by its import path (``torch.nn.modules.rnn.GRU``),
    an import path as given, several of them in parentheses, a predicate by its qualified name."""
    if isinstance(target, type):
        return f"{target.__module__}.{target.__qualname__}"
    if isinstance(target, str):
        return target
    if isinstance(target, (tuple, list)):
        return "(" + ", ".join(describe_target(t) for t in target) + ")"
    if target is None:
        return "None"
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"predicate {name}"


def _matches(pattern: str, name: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def _check_patterns(patterns: Iterable[str] | None, argument: str) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    patterns = list(patterns)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"`{argument}` must be a list of name patterns (str), got {p!r}")
    return patterns


def passes_policy(include: Iterable[str] | None, name: str, exclude: Iterable[str] | None = None) -> bool:
    """True when ``name`` is not excluded and is included (``include=None`` includes all)."""
    exclude = _check_patterns(exclude, "exclude")
    include = _check_patterns(include, "include")
    if exclude is not None and any(_matches(p, name) for p in exclude):
        return False
    if include is None:
        return True
    return any(_matches(p, name) for p in include)


def find_targets(
    root: nn.Module,
    target: Target,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    *,
    outermost_only: bool = True,
    skip: Callable[[nn.Module], bool] | None = None,
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(qualified_name, module)`` for every matching submodule of ``root``, root included.

    A module reachable under several names is yielded once (its first name). With
    ``outermost_only`` a match inside another match is not yielded (the outer one already
    covers it). ``skip(module)`` marks modules to leave alone together with their children
    (e.g. ones a callback already transformed).
    """
    predicate = resolve_target(target)
    include = _check_patterns(include, "include")
    exclude = _check_patterns(exclude, "exclude")
    matched_prefixes: list[str] = []
    skipped_prefixes: list[str] = []
    seen: set[int] = set()
    for name, module in root.named_modules():
        if any(name == p or name.startswith(p + ".") if p else True for p in skipped_prefixes):
            continue
        if skip is not None and skip(module):
            skipped_prefixes.append(name)
            continue
        if outermost_only and any(name.startswith(p + ".") if p else True for p in matched_prefixes):
            continue
        if id(module) in seen:
            continue
        if passes_policy(include, name, exclude) and predicate(name, module):
            seen.add(id(module))
            matched_prefixes.append(name)
            yield name, module
