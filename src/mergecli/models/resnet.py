"""The CIFAR ResNet-20 (He et al. 2016, section 4.2) with a width multiplier."""

from __future__ import annotations

import torch
from torch import nn

from mergecli.errors import MergeCliError
from mergecli.models._args import positive_float, positive_int, scaled

# The projection where a block changes shape: a 3x3 conv (mergecli's first ResNet-20, kept the
# default so its checkpoints load) or a 1x1 conv, He et al.'s option B, as the ResNet-20s that
# ZipIt!, Git Re-Basin and CCA Merge train (0.27M parameters at width 1 on CIFAR-10).
SHORTCUTS = {"conv3x3": 3, "conv1x1": 1}


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 conv with padding 1 and no bias (a BatchNorm always follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual connection."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, shortcut_kernel: int = 3
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        if stride != 1 or in_channels != out_channels:
            # A learned projection where the shape changes, so the residual can be added.
            projection = nn.Conv2d(
                in_channels,
                out_channels,
                shortcut_kernel,
                stride=stride,
                padding=shortcut_kernel // 2,
                bias=False,
            )
            self.shortcut = nn.Sequential(projection, nn.BatchNorm2d(out_channels))
        else:
            # Empty Sequential is the identity; keeps `self.shortcut(x)` uniform for tracing.
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv-bn-relu, conv-bn, add shortcut, relu."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu(out)


class ResNet(nn.Module):
    """Stem, three stages of BasicBlocks (stride 1, 2, 2), global average pool, Linear head."""

    def __init__(
        self,
        blocks_per_stage: int,
        width: float,
        in_channels: int,
        num_classes: int,
        shortcut_kernel: int = 3,
    ) -> None:
        super().__init__()
        widths = [scaled(c, width) for c in (16, 32, 64)]
        self.conv = conv3x3(in_channels, widths[0])
        self.bn = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        channels = widths[0]
        stages = []
        for i, out_channels in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                # Downsample at the start of every stage except the first.
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride, shortcut_kernel))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (N, C, H, W) images to (N, num_classes) logits."""
        x = self.relu(self.bn(self.conv(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.pool(x)
        return self.head(torch.flatten(x, 1))


def resnet20(
    *,
    width: float = 1,
    in_channels: int = 3,
    num_classes: int = 10,
    shortcut: str = "conv3x3",
) -> ResNet:
    """ResNet-20 for 32x32 images: 3 stages x 3 BasicBlocks, 16/32/64 channels x ``width``."""
    if not isinstance(shortcut, str) or shortcut not in SHORTCUTS:
        raise MergeCliError(
            f"model.args.shortcut: resnet20 has shortcuts {', '.join(SHORTCUTS)}, got "
            f"{shortcut!r}; set model.args.shortcut to one of them"
        )
    return ResNet(
        blocks_per_stage=3,
        width=positive_float("resnet20", "width", width),
        in_channels=positive_int("resnet20", "in_channels", in_channels),
        num_classes=positive_int("resnet20", "num_classes", num_classes),
        shortcut_kernel=SHORTCUTS[shortcut],
    )
