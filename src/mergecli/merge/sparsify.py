"""Sparsifying task vectors: keep the largest magnitudes, or a random subset."""

from __future__ import annotations

import torch
from torch import Tensor


def keep_top_magnitude(delta: Tensor, density: float) -> Tensor:
    """TIES trimming: zero all but the ``density`` fraction of entries largest in magnitude."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(delta.abs().reshape(-1), descending=True)[:k]] = 1
    return delta * mask.reshape(delta.shape)


def drop_and_rescale(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability ``density``, rescaled to the same L1 norm."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
    kept = delta * keep
    before, after = delta.abs().sum(), kept.abs().sum()
    # Rescaling by the L1 norms (as mergekit does) rather than 1/density keeps the task
    # vector's size exact for every draw, not only in expectation.
    return kept * (before / after) if after > 1e-7 else kept
