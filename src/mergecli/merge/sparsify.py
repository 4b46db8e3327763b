"""Sparsifying task vectors: keep the largest magnitudes, or a random subset."""

from __future__ import annotations

import torch
from torch import Tensor


def keep_top_magnitude(delta: Tensor, density: float) -> Tensor:
    """TIES trimming: zero all but the ``density`` fraction of entries largest in magnitude."""
    if density >= 1:
        return delta
    magnitude = delta.abs().reshape(-1)
    n = magnitude.numel()
    k = max(1, int(density * n))
    # A selection (kthvalue) instead of a full sort: linear time, no index array the size of
    # the tensor, which is what bounds the memory of a merge of large embeddings.
    threshold = magnitude.kthvalue(n - k + 1).values
    keep = magnitude > threshold
    ties = (magnitude == threshold).nonzero().reshape(-1)
    keep[ties[: k - int(keep.sum())]] = True  # of equal magnitudes, the first ones in order
    return delta * keep.reshape(delta.shape)


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
