"""The residual MLP block the offloading tests wrap (dropout on, counts its forward calls)."""

from __future__ import annotations

import torch
from torch import nn

D = 16


class Block(nn.Module):
    def __init__(self, d: int = D, p: float = 0.3):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(p)
        self.calls = 0

    def forward(self, x, scale=1.0):
        self.calls += 1
        return x + self.drop(self.fc2(torch.relu(self.fc1(x)))) * scale
