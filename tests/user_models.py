"""Models written the ordinary ways users write them, for the alignment tests.

Each entry of ``USER_MODELS``: a factory, the input shape (without the batch), how many
permutation groups its spec must have, and a phrase every warning must contain (None: no
warning). Small widths keep the whole set to a few seconds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """torchvision's ResNet block: identity = x, an optional downsample, out += identity."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's bottleneck block: 1x1, 3x3, 1x1 with expansion 4."""

    def __init__(self, inplanes: int, width: int, stride: int = 1) -> None:
        super().__init__()
        planes = 4 * width
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet layout: 7x7 stem, max pool, two stages, flatten after avgpool."""

    def __init__(self, bottleneck: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        if bottleneck:
            self.layer1 = nn.Sequential(Bottleneck(8, 4), Bottleneck(16, 4))
            self.layer2 = nn.Sequential(Bottleneck(16, 8, 2), Bottleneck(32, 8))
        else:
            self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
            self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32 if bottleneck else 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand, depthwise, project; ``x + conv(x)`` when shapes allow."""

    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == out
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()),
            InvertedResidual(8, 8, 1, 2),
            InvertedResidual(8, 12, 2, 3),
            InvertedResidual(12, 12, 1, 3),
            nn.Sequential(nn.Conv2d(12, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class PreActBlock(nn.Module):
    """Pre-activation block: BN and ReLU before each conv; the shortcut reads the activation."""

    def __init__(self, inp: int, out: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inp)
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        if stride != 1 or inp != out:
            self.shortcut = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.layers = nn.Sequential(PreActBlock(8, 8), PreActBlock(8, 16, 2))
        self.bn = nn.BatchNorm2d(16)
        self.linear = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.avg_pool2d(F.relu(self.bn(self.layers(self.conv1(x)))), 4)
        return self.linear(out.view(out.size(0), -1))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // 2, 1)
        self.fc2 = nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class SENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.se = SqueezeExcitation(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv2(self.se(F.silu(self.conv1(x)))))
        return self.head(x.mean(dim=[2, 3]))


class TorchvisionVGG(nn.Module):
    """torchvision's VGG classifier: AdaptiveAvgPool2d((k, k)), flatten, Linear(C*k*k, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = nn.Sequential(
            nn.Linear(8 * 9, 32), nn.ReLU(True), nn.Dropout(),
            nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class DenseBlock(nn.Module):
    """DenseNet-style growth: each conv reads the concat of everything before it."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = F.relu(self.c0(x))
        grown = torch.cat([x0, F.relu(self.c1(x0))], 1)
        grown = torch.cat([grown, F.relu(self.c2(grown))], 1)
        return self.fc(grown.mean((2, 3)))


class AudioConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 8, 5, padding=2)
        self.bn = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c2(F.relu(self.bn(self.c1(x)))))
        return self.fc(x.amax(-1))


class LSTMClassifier(nn.Module):
    """An LSTM the tracer keeps whole (its own weights stay), a permutable MLP head after it."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc2(F.relu(self.fc1(out[:, -1])))


class CrossAttention(nn.Module):
    """nn.MultiheadAttention with kdim/vdim: separate q, k, v projections."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 16)
        self.kv = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = torch.relu(self.kv(x))
        out, _ = self.attn(self.q(x), memory, memory)
        return self.head(out.mean(1))


class ChannelsLastClassifier(nn.Module):
    """Channels flattened after positions: not runs of one channel, so left unpermuted."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.fc = nn.Linear(4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).permute(0, 2, 3, 1).flatten(1))


USER_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, str | None]] = {
    "torchvision-resnet-basic": (TorchvisionResNet, (3, 32, 32), 6, None),
    "torchvision-resnet-bottleneck": (lambda: TorchvisionResNet(True), (3, 32, 32), 11, None),
    "mobilenet-v2": (MobileNetV2, (3, 32, 32), 6, None),
    "preact-resnet": (PreActResNet, (3, 8, 8), 4, None),
    "squeeze-excitation": (SENet, (3, 8, 8), 3, None),
    "torchvision-vgg": (TorchvisionVGG, (3, 16, 16), 4, None),
    "dense-block": (DenseBlock, (3, 8, 8), 3, None),
    "conv1d": (AudioConv1d, (2, 16), 2, None),
    "lstm-then-mlp": (LSTMClassifier, (7, 4), 1, None),
    "cross-attention": (CrossAttention, (5, 6), 3, None),
    "channels-last-flatten": (
        ChannelsLastClassifier,
        (2, 2, 2),
        0,
        "flattens units together with axes before them",
    ),
}
