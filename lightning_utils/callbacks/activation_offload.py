"""``ActivationOffload``: run chosen submodules as offloaded activation checkpoints.

Each matching submodule (say every transformer block) keeps only its inputs during the forward,
copied to pinned host memory on CUDA, and recomputes its forward in backward on the device the
inputs came from. Memory for activations drops to about one block's worth plus the (host-side)
block inputs, for the price of one extra forward per block. On CPU-only runs the inputs are not
copied anywhere (there is no device memory to save) but the blocks are still checkpointed.
A block handed a mutable cache (a Hugging Face ``DynamicCache``, which models create whenever
``use_cache`` is on) never has it written twice: in training an empty one is left out, otherwise
the block runs once, plainly (``lightning_utils.modules.offload.caches``; one warning each).

The callback acts in ``setup`` (and right after ``configure_model``), before the checkpoint
restore and before the optimizers exist (see ``module_transform``); it changes no parameter and
no state-dict key, so checkpoints with and without it are interchangeable. It must never wrap a
module twice or offload parameters and buffers. The mechanism lives in
``lightning_utils.modules.offload``.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lightning_utils.callbacks.module_transform import ModuleTransform
from lightning_utils.modules.offload import apply_activation_offload
from lightning_utils.modules.targets import Target

__all__ = ["ActivationOffload"]


class ActivationOffload(ModuleTransform):
    """Offloaded activation checkpointing for every submodule matching ``target``.

    Args:
        target: a module class (e.g. your transformer block), a tuple of classes, an import
            path such as ``"my_pkg.model.Block"``, or a predicate ``(name, module) -> bool``.
        pin_memory: copy into page-locked host memory, which makes the copies asynchronous.
        min_bytes: tensor inputs smaller than this are kept where they are (not copied).
        offload: ``False`` gives plain recompute checkpointing without the host copies.
        include / exclude: qualified-name patterns (prefix or glob) limiting where to look;
            ``exclude`` wins; ``None`` means everywhere.
        verbose: log the wrapped module names on rank zero.

    Example::

        trainer = Trainer(callbacks=[ActivationOffload(target=TransformerBlock)])
    """

    label = "ActivationOffload"
    nothing_done = "nothing is checkpointed"
    target: Target  # required here (never None)

    def __init__(
        self,
        target: Target,
        pin_memory: bool = True,
        min_bytes: int = 0,
        offload: bool = True,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(target, include, exclude, verbose)
        if not isinstance(min_bytes, int) or min_bytes < 0:
            raise ValueError(f"`min_bytes` must be an int >= 0, got {min_bytes!r}")
        self.pin_memory = pin_memory
        self.min_bytes = min_bytes
        self.offload = offload
        self.wrapped: list[str] = []
        """Qualified names of the modules wrapped so far."""

    def _transform(self, module: nn.Module, root_replaceable: bool) -> nn.Module:
        names = apply_activation_offload(
            module,
            self.target,
            pin_memory=self.pin_memory,
            min_bytes=self.min_bytes,
            offload=self.offload,
            include=self.include,
            exclude=self.exclude,
        )
        self.wrapped.extend(names)
        if names:
            self._log(f"wrapped {len(names)} modules: {', '.join(names)}")
        return module

    def _transformed(self) -> list[str]:
        return self.wrapped
