"""CIFAR-style VGG 11/16 with a width multiplier."""

from __future__ import annotations

import torch
from torch import nn

from mergecli.errors import MergeCliError
from mergecli.models._args import boolean, positive_float, positive_int, scaled

# Output channels of each 3x3 conv; "M" is a 2x2 max-pool.
CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class ConvBlock(nn.Module):
    """3x3 conv (padding 1), optional BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, batchnorm: bool) -> None:
        super().__init__()
        # The bias is redundant when BN follows (BN has its own shift).
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batchnorm)
        self.bn = nn.BatchNorm2d(out_channels) if batchnorm else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply conv, norm and activation."""
        return self.relu(self.bn(self.conv(x)))


class VGG(nn.Module):
    """Conv blocks and max-pools from a cfg list, global average pool, Linear head."""

    def __init__(
        self,
        cfg: list[int | str],
        width: float,
        batchnorm: bool,
        in_channels: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                # ceil_mode keeps 28x28 (MNIST) inputs at >= 1x1 after five pools
                # (28-14-7-4-2-1); 32x32 inputs are unaffected (32-16-8-4-2-1).
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                out = scaled(int(item), width)
                layers.append(ConvBlock(channels, out, batchnorm))
                channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (N, C, H, W) images to (N, num_classes) logits."""
        x = self.pool(self.features(x))
        return self.head(torch.flatten(x, 1))


def vgg(
    *,
    variant: int = 11,
    width: float = 1.0,
    batchnorm: bool = False,
    in_channels: int = 3,
    num_classes: int = 10,
) -> VGG:
    """VGG-11 or VGG-16 for small images, channels scaled by ``width``."""
    if isinstance(variant, bool) or variant not in CONFIGS:
        raise MergeCliError(
            f"model.args.variant: vgg has variants {', '.join(map(str, CONFIGS))}, "
            f"got {variant!r}; set model.args.variant to one of them"
        )
    return VGG(
        cfg=CONFIGS[variant],
        width=positive_float("vgg", "width", width),
        batchnorm=boolean("vgg", "batchnorm", batchnorm),
        in_channels=positive_int("vgg", "in_channels", in_channels),
        num_classes=positive_int("vgg", "num_classes", num_classes),
    )
