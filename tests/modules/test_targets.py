"""lightning_utils.modules.targets: the include/exclude name policy and which submodules match."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_utils.modules.targets import find_targets, passes_policy


def test_policy_semantics():
    assert passes_policy(None, "anything")
    assert not passes_policy([], "anything")
    assert passes_policy(["model"], "model.0") and passes_policy(["model"], "model")
    assert not passes_policy(["model"], "models.0")  # prefix means a dotted path prefix
    assert passes_policy(["*.attn"], "layers.3.attn")
    assert not passes_policy(["model"], "model.0", exclude=["model.0"])  # exclude first
    assert passes_policy(None, "head", exclude=["model"])
    with pytest.raises(TypeError, match="`include`"):
        passes_policy([1], "x")


def test_find_targets_outermost_and_shared():
    shared = nn.Linear(2, 2)
    root = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), shared, shared)
    names = [n for n, _ in find_targets(root, (nn.Linear, nn.Sequential))]
    assert names == [""]  # the root matches and covers everything
    names = [n for n, _ in find_targets(root, nn.Linear)]
    assert names == ["0.0", "1"]  # the shared module once
