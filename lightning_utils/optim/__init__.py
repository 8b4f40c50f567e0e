"""Optimizers and learning-rate schedules: APOLLO / APOLLO-Mini, warmup and Noam.

What it is for: the public names of :mod:`lightning_utils.optim`, usable by class path from
LightningCLI (``--optimizer lightning_utils.optim.ApolloMini``,
``--lr_scheduler lightning_utils.optim.WarmupLR``).

What it must never do: import anything beyond torch (no optional dependency, no upstream
APOLLO package).
"""

from lightning_utils.optim.apollo import Apollo, ApolloMini
from lightning_utils.optim.schedulers import NoamLR, WarmupLR
from lightning_utils.optim.selection import apollo_param_groups, uses_apollo

__all__ = ["Apollo", "ApolloMini", "NoamLR", "WarmupLR", "apollo_param_groups", "uses_apollo"]
