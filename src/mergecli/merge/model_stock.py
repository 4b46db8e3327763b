"""Model Stock: the average of the fine-tunes pulled toward the base by their angle."""

from __future__ import annotations

import torch
from torch import Tensor

from mergecli.errors import MergeCliError
from mergecli.merge.step import merge_method

# Entries per block of a flat dot product: float32 rounding stays that of 4,096 terms.
_BLOCK = 1 << 12


def two_fine_tunes(n: int, has_base: bool) -> str | None:
    """Model Stock's angle needs two offsets from the base (a recipe without one is told so by
    the base check)."""
    if not has_base or n >= 2:
        return None
    return (
        f"merge model_stock: needs a base and at least two fine-tuned checkpoints, got {n} "
        "besides the base; add another fine-tune of the base or use task_arithmetic"
    )


@merge_method("model_stock", needs_base=True, model_count=two_fine_tunes)
def model_stock(models: Tensor, weights: Tensor, base: Tensor, filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al., 2024): t w_avg + (1 - t) w_0, t = N cos / (1 + (N - 1) cos).

    cos is the mean cosine of the angles between the N fine-tunes' offsets from the base w_0,
    over all pairs, of each tensor taken as one vector (``filter_wise``: of each row, i.e. along
    the last dimension, as mergekit 0.1.5 does). Where 1 + (N - 1) cos vanishes (|.| < 1e-6)
    there is no finite t and the base is kept, as in mergekit. The checkpoints' weights play
    no part: the paper and mergekit average the fine-tunes uniformly.
    """
    n = len(models)
    if problem := two_fine_tunes(n, True):
        raise MergeCliError(problem)
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = models.reshape(n, *w0.shape)
    else:
        w0 = base.reshape(-1)
        ws = models.reshape(n, -1)
    offsets = ws.sub_(w0)  # in place: the engine hands each method a fresh stack
    norms = torch.linalg.vector_norm(offsets, dim=-1)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = _row_dots(offsets[i], offsets[j]) if filter_wise else _dot(offsets[i], offsets[j])
            # A zero offset would divide by 0; mergekit clamps the norms' product at 1e-6.
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    # t w_avg + (1 - t) w_0, written as w_0 + t (w_avg - w_0), in place in the sum of offsets.
    return offsets.sum(dim=0).div_(n).mul_(t).add_(w0).reshape(shape)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """The dot product of two flat tensors without their entrywise product (a copy of a
    tensor): one batched product of blocks of ``_BLOCK`` entries, the blocks' dots summed in
    float64, so that rounding does not grow with the tensor's size."""
    whole = a.numel() // _BLOCK * _BLOCK
    blocks = _row_dots(a[:whole].view(-1, _BLOCK), b[:whole].view(-1, _BLOCK))
    rest = torch.dot(a[whole:], b[whole:])
    return (blocks.double().sum() + rest.double()).to(a.dtype)


def _row_dots(a: Tensor, b: Tensor) -> Tensor:
    """Dot products along the last dimension as batched 1×C by C×1 products (no entrywise
    product held); a scalar's is its product."""
    if a.dim() < 2:
        return (a * b).sum(dim=-1)
    c = a.shape[-1]
    products = torch.bmm(a.reshape(-1, 1, c), b.reshape(-1, c, 1))
    return products.reshape(a.shape[:-1])
