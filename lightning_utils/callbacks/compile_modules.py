"""``CompileModules``: ``torch.compile`` the model or chosen submodules in place, keys unchanged.

``torch.compile(module)`` returns an ``OptimizedModule`` wrapper whose state-dict keys gain an
``_orig_mod.`` prefix, so checkpoints stop loading into an uncompiled model (Lightning #17415,
#20233). ``nn.Module.compile()`` compiles the module's ``__call__`` in place instead: the module,
its parameters and its keys stay exactly as they were. This callback does that in ``setup``
(and right after ``configure_model``), before the checkpoint restore and the strategy's wrapping.

With ``target=None`` the LightningModule itself is compiled, which speeds up ``self(...)`` calls
made from ``training_step`` (Lightning calls ``training_step`` directly, not ``forward``). Pass a
target (e.g. the transformer block class) to compile submodules. It must never wrap modules in
``OptimizedModule`` or compile a module twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_utils.callbacks.module_transform import check_not_wrapped, transform_before_restore
from lightning_utils.modules.targets import Target, find_targets, resolve_target

__all__ = ["CompileModules"]


def _is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


class CompileModules(Callback):
    """Compile the whole model (``target=None``) or every submodule matching ``target``, in place.

    Args:
        target: ``None`` for the LightningModule itself, else a module class, tuple of classes,
            import path, or predicate ``(name, module) -> bool``.
        backend: a ``torch.compile`` backend name (``"inductor"``, ``"aot_eager"``, ``"eager"``,
            ``"cudagraphs"``) or a backend callable. The default is inductor, explicitly (the
            original utilities' ``"auto"`` silently picked ``cudagraphs``).
        mode / fullgraph / dynamic / options: passed to ``torch.compile``.
        include / exclude: qualified-name patterns limiting where ``target`` is looked for.
        verbose: log what was compiled on rank zero.
    """

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
        if target is not None:
            resolve_target(target)
        if isinstance(backend, str):
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            if backend not in known:
                raise ValueError(f"`backend`: unknown torch.compile backend {backend!r}; known: {known}")
        elif not callable(backend):
            raise TypeError(f"`backend` must be a backend name or callable, got {type(backend).__name__}")
        if mode is not None and options is not None:
            raise ValueError("`mode` and `options` cannot both be given (torch.compile's rule)")
        self.target = target
        self.backend = backend
        self.mode = mode
        self.fullgraph = fullgraph
        self.dynamic = dynamic
        self.options = options
        self.include = None if include is None else list(include)
        self.exclude = None if exclude is None else list(exclude)
        self.verbose = verbose
        self.compiled: list[str] = []
        """Qualified names compiled so far (``""`` is the root)."""

    def _compile_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"backend": self.backend, "fullgraph": self.fullgraph, "dynamic": self.dynamic}
        if self.mode is not None:
            kwargs["mode"] = self.mode
        if self.options is not None:
            kwargs["options"] = self.options
        return kwargs

    def apply(self, module: nn.Module) -> nn.Module:
        """Compile in place (``module.compile(...)``) and return the same module object."""
        check_not_wrapped(module)
        if self.target is None:
            targets = [] if _is_compiled(module) else [("", module)]
        else:
            targets = list(find_targets(module, self.target, self.include, self.exclude, skip=_is_compiled))
        for name, sub in targets:
            sub.compile(**self._compile_kwargs())
            self.compiled.append(name)
        if targets and self.verbose:
            rank_zero_info(f"CompileModules: compiled {[n or '<root>' for n, _ in targets]}")
        return module

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        transform_before_restore(pl_module, f"CompileModules@{id(self)}", self.apply)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.compiled:
            rank_zero_warn(f"CompileModules: no submodule matched target={self.target!r}; nothing was compiled")
