"""Codebook interleaving patterns for multi-codebook audio-token language models.

A codec gives ``K`` codebooks per frame; a pattern decides which code sits at which step of the
sequence a transformer reads. Pick a provider, get the pattern for a length, then build the
sequence for the model and revert its logits for the loss::

    from lightning_utils.patterns import DelayedPatternProvider

    pattern = DelayedPatternProvider(n_q=4).get_pattern(timesteps=codes.shape[-1])
    seq, _, seq_mask = pattern.build_pattern_sequence(codes, special_token=card, keep_only_valid_steps=True)
    logits = model(seq)                                        # [B, card, K, S]
    logits, _, mask = pattern.revert_pattern_logits(logits, float("nan"), keep_only_valid_steps=True)
    loss = F.cross_entropy(logits[:, :, mask], codes[:, mask])  # [B, card, N] vs [B, N]; mask is [K, T]

A model that takes a provider as an argument should leave it out of its saved hyperparameters
(``self.save_hyperparameters(ignore=["pattern"])``): ``.sft`` checkpoints hold no objects, and
LightningCLI rebuilds it from the config's class path.

Everything is vectorised (index tables and gathers, cached per shape and device).

It is a drop-in for audiocraft's ``audiocraft.modules.codebooks_patterns``: the same classes,
methods, properties, signatures, defaults and results (``timesteps=0`` and the two
``_build_*_scatter_indexes`` helpers included), and a subclass that writes ``get_pattern``
itself, as audiocraft's providers do, works and is cached. Bad arguments raise
:class:`PatternError`, a ``ValueError`` that is also the ``AssertionError`` audiocraft raises.
On top: conversions need no contiguous input and never wrap a special token that the codes'
dtype cannot hold, ``Pattern`` takes plain ``(t, q)`` pairs or :meth:`Pattern.from_coordinates`
tensors, answers step queries for any timestep, and providers pickle and have a ``repr`` that
rebuilds them.

What it must never do: own a model, a loss or a tokenizer (it only lays tokens out), or import
anything beyond torch.
"""

from lightning_utils.patterns.pattern import LayoutCoord, Pattern, PatternError, PatternLayout
from lightning_utils.patterns.providers import (
    CoarseFirstPattern,
    CodebooksPatternProvider,
    DelayedPatternProvider,
    MusicLMPattern,
    ParallelPatternProvider,
    UnrolledPatternProvider,
)

__all__ = [
    "CoarseFirstPattern",
    "CodebooksPatternProvider",
    "DelayedPatternProvider",
    "LayoutCoord",
    "MusicLMPattern",
    "ParallelPatternProvider",
    "Pattern",
    "PatternError",
    "PatternLayout",
    "UnrolledPatternProvider",
]
