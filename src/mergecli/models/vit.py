"""A small pre-norm Vision Transformer, written out by hand so every weight is a named module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mergecli.errors import MergeCliError
from mergecli.models._args import positive_int


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection and an output ``proj``."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, dim) -> (N, T, dim)."""
        # (N, T, 3*dim) -> (3, N, heads, T, head_dim); static sizes only, so torch.fx can trace.
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        # Back to (N, T, dim) with heads concatenated in qkv's order.
        out = out.transpose(1, 2).flatten(2)
        return self.drop(self.proj(out))


class MLPBlock(nn.Module):
    """The transformer feed-forward part: ``fc1``, GELU, ``fc2``."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, dim) -> (N, T, dim)."""
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, dim) -> (N, T, dim)."""
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class ViT(nn.Module):
    """Patch embedding, class token, position embedding, transformer blocks, head on class token."""

    def __init__(
        self,
        image_size: int,
        patch: int,
        in_channels: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        num_classes: int,
        dropout: float,
    ) -> None:
        super().__init__()
        num_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        # Small random init as in ViT/timm; zeros would make all positions identical.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (N, C, image_size, image_size) images to (N, num_classes) logits."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0])


def vit(
    *,
    image_size: int = 32,
    patch: int = 4,
    in_channels: int = 3,
    dim: int = 128,
    depth: int = 6,
    heads: int = 4,
    mlp_dim: int | None = None,
    num_classes: int = 10,
    dropout: float = 0.0,
) -> ViT:
    """Small pre-norm ViT; ``mlp_dim`` defaults to 4 * dim."""
    image_size = positive_int("vit", "image_size", image_size)
    patch = positive_int("vit", "patch", patch)
    dim = positive_int("vit", "dim", dim)
    heads = positive_int("vit", "heads", heads)
    mlp_dim = 4 * dim if mlp_dim is None else positive_int("vit", "mlp_dim", mlp_dim)
    if image_size % patch != 0:
        raise MergeCliError(
            f"model.args.patch: vit needs image_size ({image_size}) divisible by patch "
            f"({patch}); choose a patch size that divides the image size"
        )
    if dim % heads != 0:
        raise MergeCliError(
            f"model.args.heads: vit needs dim ({dim}) divisible by heads ({heads}); "
            f"choose heads that divide dim"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise MergeCliError(
            f"model.args.dropout: vit needs a probability in [0, 1), got {dropout!r}"
        )
    return ViT(
        image_size=image_size,
        patch=patch,
        in_channels=positive_int("vit", "in_channels", in_channels),
        dim=dim,
        depth=positive_int("vit", "depth", depth),
        heads=heads,
        mlp_dim=mlp_dim,
        num_classes=positive_int("vit", "num_classes", num_classes),
        dropout=float(dropout),
    )
