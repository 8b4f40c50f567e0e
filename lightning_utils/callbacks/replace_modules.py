"""``ReplaceModules``: swap submodules (by class and name policy) before restore and optimizers.

The callback replaces every matching submodule in ``setup`` (and right after
``configure_model``, see ``module_transform``), i.e. before Lightning loads a checkpoint into the
model and before the strategy builds the optimizers. So ``fit(ckpt_path=...)`` loads with
``strict=True`` into the replaced model and the optimizer holds the new parameters. Weights are
carried over (see ``lightning_utils.modules.swap``) so an exact replacement gives identical
outputs. Presets for torchao / bitsandbytes / SDPA live in ``lightning_utils.modules.presets``.

It must never replace modules after the optimizers exist or on a DDP-wrapped model, and never
replace a module it produced itself (``setup`` runs again for each trainer entry point).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

from torch import nn

from lightning_utils.callbacks.module_transform import ModuleTransform
from lightning_utils.modules.swap import Replacement, replace_modules
from lightning_utils.modules.targets import Target

__all__ = ["ReplaceModules"]


class ReplaceModules(ModuleTransform):
    """Replace every submodule matching ``target`` (and the name policy) with ``replacement``.

    Args:
        target: module class, tuple of classes, import path (``"torch.nn.Linear"``) or
            predicate ``(name, module) -> bool``.
        replacement: an ``nn.Module`` class (built from the old module's attributes, or with
            its ``from_module(old)``), or a factory ``(qualified_name, old) -> new`` such as the
            presets in ``lightning_utils.modules.presets``.
        include / exclude: qualified-name patterns (dotted prefix or glob). ``exclude`` is
            checked first; ``include=None`` means everything, ``include=[]`` nothing.
        copy_weights: carry the old parameters and buffers over under the same keys.
        verbose: log what was replaced on rank zero.

    Example::

        ReplaceModules(nn.Linear, torchao_linear(), include=["model.layers"], exclude=["*.lm_head"])
    """

    label = "ReplaceModules"
    nothing_done = "nothing was replaced"
    target: Target  # required here (never None)

    def __init__(
        self,
        target: Target,
        replacement: Replacement,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        copy_weights: bool = True,
        verbose: bool = False,
    ) -> None:
        super().__init__(target, include, exclude, verbose)
        if not (isinstance(replacement, type) or callable(replacement)):
            raise TypeError(
                "`replacement` must be an nn.Module class or a factory (name, old) -> new, got "
                f"{type(replacement).__name__}"
            )
        self.replacement = replacement
        self.copy_weights = copy_weights
        self.replaced: list[str] = []
        """Qualified names replaced so far."""
        self._produced: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def _transform(self, module: nn.Module, root_replaceable: bool) -> nn.Module:
        new_root, done = replace_modules(
            module,
            self.target,
            self.replacement,
            include=self.include,
            exclude=self.exclude,
            copy_weights=self.copy_weights,
            produced=self._produced,
            allow_root=root_replaceable,
        )
        self.replaced.extend(done)
        if done:
            kinds = sorted({type(m).__name__ for m in done.values()})
            self._log(f"replaced {len(done)} modules with {kinds}: {', '.join(done)}")
        return new_root

    def _transformed(self) -> list[str]:
        return self.replaced
