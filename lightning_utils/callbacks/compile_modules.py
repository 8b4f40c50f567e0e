"""``CompileModules``: ``torch.compile`` the model or chosen submodules in place, keys unchanged.

``torch.compile(module)`` returns an ``OptimizedModule`` wrapper whose state-dict keys gain an
``_orig_mod.`` prefix, so checkpoints stop loading into an uncompiled model.
``nn.Module.compile()`` compiles the module's ``__call__`` in place instead: the module, its
parameters and its keys stay exactly as they were. This callback does that in ``setup`` (and
right after ``configure_model``, see ``module_transform``), before the checkpoint restore and the
strategy's wrapping.

With ``target=None`` the LightningModule itself is compiled, which speeds up ``self(...)`` calls
made from ``training_step`` (Lightning calls ``training_step`` directly, not ``forward``). Pass a
target (e.g. the transformer block class) to compile submodules. A module that
``ActivationOffload`` wrapped first gets its own forward compiled inside the checkpoint (the
forward and the recompute run compiled; the checkpoint machinery and module hooks stay eager),
never its call. It must never wrap modules in ``OptimizedModule`` or compile a module twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_utils._internals import is_compiled_in_place
from lightning_utils.callbacks.module_transform import ModuleTransform
from lightning_utils.modules.offload import compile_offloaded, is_offload_compiled, is_offloaded
from lightning_utils.modules.targets import Target, find_targets

__all__ = ["CompileModules"]


class CompileModules(ModuleTransform):
    """Compile the whole model (``target=None``) or every submodule matching ``target``, in place.

    Args:
        target: ``None`` for the LightningModule itself, else a module class, tuple of classes,
            import path, or predicate ``(name, module) -> bool``.
        backend: a ``torch.compile`` backend name (``"inductor"``, ``"aot_eager"``, ``"eager"``,
            ``"cudagraphs"``) or a backend callable. The default is inductor, named explicitly.
        mode / fullgraph / dynamic / options: passed to ``torch.compile``.
        include / exclude: qualified-name patterns limiting where ``target`` is looked for.
        verbose: log what was compiled on rank zero.
    """

    label = "CompileModules"
    nothing_done = "nothing was compiled"
    target_optional = True

    def __init__(
        self,
        target: Target | None = None,
        backend: str | Callable[..., Any] = "inductor",
        mode: str | None = None,
        fullgraph: bool = False,
        dynamic: bool | None = None,
        options: dict[str, Any] | None = None,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(target, include, exclude, verbose)
        if isinstance(backend, str):
            known = torch.compiler.list_backends(exclude_tags=())
            if backend not in known:
                raise ValueError(f"`backend`: unknown torch.compile backend {backend!r}; known: {known}")
        elif not callable(backend):
            raise TypeError(f"`backend` must be a backend name or callable, got {type(backend).__name__}")
        if mode is not None and options is not None:
            raise ValueError("`mode` and `options` cannot both be given (torch.compile's rule)")
        self.backend = backend
        self.mode = mode
        self.fullgraph = fullgraph
        self.dynamic = dynamic
        self.options = options
        self.compiled: list[str] = []
        """Qualified names compiled so far (``""`` is the root)."""

    def _compile_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"backend": self.backend, "fullgraph": self.fullgraph, "dynamic": self.dynamic}
        if self.mode is not None:
            kwargs["mode"] = self.mode
        if self.options is not None:
            kwargs["options"] = self.options
        return kwargs

    def _transform(self, module: nn.Module, root_replaceable: bool) -> nn.Module:
        if self.target is None:
            targets = [] if _compiled(module) else [("", module)]
        else:
            targets = list(find_targets(module, self.target, self.include, self.exclude, skip=_compiled))
        for name, sub in targets:
            if is_offloaded(sub):
                compile_offloaded(sub, **self._compile_kwargs())
            else:
                sub.compile(**self._compile_kwargs())
            self.compiled.append(name)
        if targets:
            self._log(f"compiled {[n or '<root>' for n, _ in targets]}")
        return module

    def _transformed(self) -> list[str]:
        return self.compiled


def _compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled already: in place, or its forward inside its checkpoint."""
    return is_compiled_in_place(module) or is_offload_compiled(module)
