"""The projection seed scheme of :mod:`lightning_utils.optim.projection`."""

from __future__ import annotations

from lightning_utils.optim.projection import projection_seed


def test_projection_seed_scheme():
    assert projection_seed(7, 0) == 7
    seeds = {projection_seed(s, k) for s in range(1, 20) for k in range(1, 20)}
    assert len(seeds) == 19 * 19 and all(0 <= s < 2**63 for s in seeds)
    assert projection_seed(3, 5) == projection_seed(3, 5)
