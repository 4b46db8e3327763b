"""Sparsifying task vectors: keep the largest magnitudes, or a random subset (in place)."""

from __future__ import annotations

import torch
from torch import Tensor

# Below this many entries a plain selection is as fast as narrowing it down first.
_SMALL = 1 << 16
_SAMPLE = 1 << 16
_BLOCK = 1 << 18


def keep_top_magnitude(delta: Tensor, density: float) -> Tensor:
    """TIES trimming: zero all but the ``density`` fraction of entries largest in magnitude.

    Works in place on ``delta`` and returns it. Of equal magnitudes at the threshold, the first
    ones in memory order are kept, so exactly ``k`` entries survive.
    """
    if density >= 1:
        return delta
    magnitude = delta.abs().reshape(-1)
    n = magnitude.numel()
    k = max(1, int(density * n))
    threshold = kth_largest(magnitude, k)
    keep = magnitude > threshold
    ties = (magnitude == threshold).nonzero().reshape(-1)
    keep[ties[: k - int(torch.count_nonzero(keep))]] = True
    return delta.mul_(keep.reshape(delta.shape))


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest entry of a 1-D tensor, exactly, in a few linear passes (Floyd-Rivest).

    A seeded sample brackets the answer between two of its order statistics; one pass counts
    the entries above the bracket and gathers those inside it, and a selection among the few
    gathered ones gives the answer. If the bracket misses (it very rarely does), a selection
    over everything does. A full kthvalue copies the tensor and runs several times slower on
    the large embeddings that dominate a merge.
    """
    n = values.numel()
    if n <= _SMALL:
        return values.kthvalue(n - k + 1).values
    generator = torch.Generator(device=values.device).manual_seed(n)
    index = torch.randint(n, (_SAMPLE,), generator=generator, device=values.device)
    sample = values[index].sort().values
    # k-th largest = rank n-k (0-based, ascending); its expected rank in the sample, +- 6 sd.
    rank = (n - k) / n * (_SAMPLE - 1)
    margin = 6 * (_SAMPLE * (k / n) * (1 - k / n)) ** 0.5 + 8
    low = sample[max(0, int(rank - margin))]
    high = sample[min(_SAMPLE - 1, int(rank + margin) + 1)]
    # Counted block by block: the masks of one block stay in cache (and bool sums are slow).
    above, parts = 0, []
    for block in values.split(_BLOCK):
        above += int(torch.count_nonzero(block > high))
        parts.append(block[(block >= low) & (block <= high)])
    inside = torch.cat(parts)
    wanted = k - above  # the answer's rank from the top among the entries inside the bracket
    if 1 <= wanted <= inside.numel():
        return inside.kthvalue(inside.numel() - wanted + 1).values
    return values.kthvalue(n - k + 1).values


def drop_and_rescale(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability ``density``, rescaled to the same L1 norm.

    Works in place on ``delta`` and returns it.
    """
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
    before = delta.abs().sum()
    kept = delta.mul_(keep)
    after = kept.abs().sum()
    # Rescaling by the L1 norms (as mergekit does) rather than 1/density keeps the task
    # vector's size exact for every draw, not only in expectation.
    return kept.mul_(before / after) if after > 1e-7 else kept
