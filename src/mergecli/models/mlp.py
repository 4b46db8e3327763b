"""A plain fully connected classifier (the usual MNIST merging benchmark)."""

from __future__ import annotations

import torch
from torch import nn

from mergecli.models._args import boolean, positive_int


class MLP(nn.Module):
    """Flatten, then ``depth - 1`` hidden Linear(+BN)+ReLU layers, then a Linear head."""

    def __init__(
        self,
        in_features: int,
        hidden: int,
        depth: int,
        num_classes: int,
        batchnorm: bool,
    ) -> None:
        super().__init__()
        widths = [in_features] + [hidden] * (depth - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n_in, n_out) for n_in, n_out in zip(widths[:-1], widths[1:], strict=True)
        )
        # Only registered when used, so checkpoints without BN have no stray keys.
        self.norms = (
            nn.ModuleList(nn.BatchNorm1d(hidden) for _ in self.layers) if batchnorm else None
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (N, ...) inputs to (N, num_classes) logits."""
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            # `self.norms` is fixed at construction, so this branch is static for torch.fx.
            if self.norms is not None:
                x = self.norms[i](x)
            x = torch.relu(x)
        return self.head(x)


def mlp(
    *,
    in_features: int = 784,
    hidden: int = 128,
    depth: int = 8,
    num_classes: int = 10,
    batchnorm: bool = False,
) -> MLP:
    """MLP with ``depth`` Linear layers in total (depth 8 = 7 hidden layers + head)."""
    return MLP(
        in_features=positive_int("mlp", "in_features", in_features),
        hidden=positive_int("mlp", "hidden", hidden),
        depth=positive_int("mlp", "depth", depth),
        num_classes=positive_int("mlp", "num_classes", num_classes),
        batchnorm=boolean("mlp", "batchnorm", batchnorm),
    )
