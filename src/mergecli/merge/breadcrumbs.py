"""Model Breadcrumbs: task vectors without their smallest entries and their largest outliers."""

from __future__ import annotations

from typing import Annotated

import annotated_types
import torch
from torch import Tensor

from mergecli.merge.sparsify import kth_largest
from mergecli.merge.step import merge_method
from mergecli.merge.task_arithmetic import (
    Density,
    Lambda,
    combine_task_vectors,
)

Gamma = Annotated[float, annotated_types.Ge(0), annotated_types.Le(1)]


def keep_between_outliers(delta: Tensor, density: float, gamma: float, rescale: bool) -> Tensor:
    """Zero the ``gamma`` fraction of entries largest in magnitude, then the smallest, so that
    ``int(density * n)`` entries are left (in place; returns ``delta``).

    As mergekit 0.1.5's ``magnitude_outliers``: with ``n_top = int(gamma n)`` and ``k =
    int(density n)``, the kept entries are ranks ``n_bot .. n_bot + k`` of the ascending
    magnitudes, ``n_bot = max(0, n - k - n_top)`` (when ``density + gamma > 1`` fewer outliers
    go, so that ``k`` entries stay). ``density >= 1`` keeps everything (``gamma`` is then
    ignored, as in mergekit). Equal magnitudes are ranked in memory order (a stable sort), so
    the same inputs always keep the same entries. ``rescale`` restores the L1 norm.
    """
    if density >= 1:
        return delta
    magnitude = delta.abs().reshape(-1)
    n = magnitude.numel()
    k = int(density * n)
    n_bot = max(0, n - k - int(gamma * n))
    # Ranks n_bot .. n_bot + k of a stable ascending sort, found by selection instead: the
    # n_bot + k smallest without the n_bot smallest (a full sort took seconds per embedding).
    keep = smallest(magnitude, n_bot + k)
    keep &= ~smallest(magnitude, n_bot)
    before = magnitude.sum()
    del magnitude
    kept = delta.mul_(keep.reshape(delta.shape))
    return restore_l1(kept, before) if rescale else kept


def smallest(magnitude: Tensor, j: int) -> Tensor:
    """A mask of the ``j`` smallest entries of a flat tensor, equal ones taken in memory order
    (the first ``j`` of a stable ascending sort)."""
    n = magnitude.numel()
    if j <= 0 or j >= n:
        return torch.full((n,), j > 0, dtype=torch.bool, device=magnitude.device)
    threshold = kth_largest(magnitude, n - j + 1)  # the j-th smallest
    mask = magnitude < threshold
    ties = (magnitude == threshold).nonzero().reshape(-1)
    mask[ties[: j - int(torch.count_nonzero(mask))]] = True
    return mask


def restore_l1(kept: Tensor, before: Tensor) -> Tensor:
    """Scale ``kept`` (in place) back to the L1 norm ``before`` it was sparsified; as mergekit
    0.1.5 does, leave it as it is when either norm is below 1e-7."""
    after = kept.abs().sum()
    if before >= 1e-7 and after >= 1e-7:
        kept.mul_(before / after)
    return kept


def sparse_task_vectors(
    models: Tensor,
    base: Tensor,
    density: float | list[float],
    gamma: float | list[float],
    rescale: bool,
) -> Tensor:
    """theta_i - base for every model, each without its outliers and small entries at its own
    ``density`` and ``gamma`` (one value, or one per model); in place in ``models``."""
    deltas = models.sub_(base)  # the engine hands each method a fresh stack
    for i, delta in enumerate(deltas):
        own_density = density[i] if isinstance(density, list) else density
        own_gamma = gamma[i] if isinstance(gamma, list) else gamma
        keep_between_outliers(delta, own_density, own_gamma, rescale)
    return deltas


@merge_method("breadcrumbs", needs_base=True, per_model=("density", "gamma"))
def breadcrumbs(
    models: Tensor,
    weights: Tensor,
    base: Tensor,
    density: Density = 1.0,
    gamma: Gamma = 0.01,
    lam: Lambda = 1.0,
    normalize: bool = False,
    rescale: bool = False,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, 2023): drop outliers and small entries, add."""
    deltas = sparse_task_vectors(models, base, density, gamma, rescale)
    return base + combine_task_vectors(deltas, weights, False, normalize, lam)


@merge_method("breadcrumbs_ties", needs_base=True, per_model=("density", "gamma"))
def breadcrumbs_ties(
    models: Tensor,
    weights: Tensor,
    base: Tensor,
    density: Density = 1.0,
    gamma: Gamma = 0.01,
    lam: Lambda = 1.0,
    normalize: bool = False,
    rescale: bool = False,
) -> Tensor:
    """Model Breadcrumbs with TIES sign election (Davari & Belilovsky, 2023; Yadav et al.)."""
    deltas = sparse_task_vectors(models, base, density, gamma, rescale)
    return base + combine_task_vectors(deltas, weights, True, normalize, lam)
