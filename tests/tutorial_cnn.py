"""The CNN of PyTorch's CIFAR tutorial, as a user brings it: `arch: "tutorial_cnn:build"`.

Its classifier reads the last conv map flattened with its positions (``x.view(-1, 16*k*k)``),
so each of that conv's channels is a run of k*k columns of fc1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TutorialNet(nn.Module):
    def __init__(self, channels: int = 3, image_size: int = 32, hidden: int = 24) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.positions = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * self.positions**2, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, 16 * self.positions**2)
        return self.fc2(F.relu(self.fc1(x)))


def build(**args) -> nn.Module:
    return TutorialNet(**args)
