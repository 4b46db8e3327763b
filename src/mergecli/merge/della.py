"""DELLA: task-vector entries dropped with probabilities ranked by magnitude, rescaled, added."""

from __future__ import annotations

from typing import Annotated

import annotated_types
import torch
from torch import Tensor

from mergecli.errors import RecipeError
from mergecli.merge.breadcrumbs import restore_l1
from mergecli.merge.step import merge_method
from mergecli.merge.task_arithmetic import Density, Lambda, combine_task_vectors

Epsilon = Annotated[float, annotated_types.Ge(0), annotated_types.Lt(1)]


def magprune(
    delta: Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator
) -> Tensor:
    """MagPrune (in place; returns ``delta``): keep each entry with probability
    p = density - epsilon + 2 epsilon (r - 1) / (m - 1), r its magnitude's rank (1 = smallest)
    among the m entries along dimension 1 (a 1-D tensor is one row), then with ``rescale``
    restore the L1 norm, as mergekit 0.1.5's ``della_magprune``.

    The mean keep probability is ``density``: small entries are dropped more often than large
    ones. ``density >= 1`` keeps everything. Equal magnitudes are ranked in memory order (a
    stable sort). Where dimension 1 has a single entry (mergekit divides 0 by 0 there), every
    entry is kept with probability ``density``.
    """
    if density >= 1:
        return delta
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise RecipeError(
            [
                f"merge: DELLA keeps entries with probabilities density ± epsilon, which must "
                f"lie strictly between 0 and 1; got density {density:g} and epsilon "
                f"{epsilon:g}: lower epsilon or move density"
            ]
        )
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    m = rows.shape[1]
    # rank - 1 of each entry's magnitude along dimension 1: the inverse of the sorting order.
    order = rows.abs().argsort(dim=1, stable=True)
    below = torch.empty_like(order).scatter_(
        1, order, torch.arange(m, device=rows.device).expand_as(order).contiguous()
    )
    position = below.to(rows.dtype) / (m - 1) if m > 1 else torch.full_like(rows, 0.5)
    probability = (density - epsilon) + 2 * epsilon * position
    keep = torch.rand(rows.shape, generator=generator, device=rows.device) < probability
    before = delta.abs().sum()
    kept = delta.mul_(keep.reshape(delta.shape))
    return restore_l1(kept, before) if rescale else kept


def sampled_task_vectors(
    models: Tensor,
    base: Tensor,
    density: float | list[float],
    epsilon: float | list[float],
    rescale: bool,
    generator: torch.Generator,
) -> Tensor:
    """theta_i - base for every model, each pruned by MagPrune at its own ``density`` and
    ``epsilon`` (one value, or one per model), in model order; in place in ``models``."""
    deltas = models.sub_(base)  # the engine hands each method a fresh stack
    for i, delta in enumerate(deltas):
        own_density = density[i] if isinstance(density, list) else density
        own_epsilon = epsilon[i] if isinstance(epsilon, list) else epsilon
        magprune(delta, own_density, own_epsilon, rescale, generator)
    return deltas


@merge_method("della", needs_base=True, per_model=("density", "epsilon"))
def della(
    models: Tensor,
    weights: Tensor,
    base: Tensor,
    generator: torch.Generator,
    density: Density = 1.0,
    epsilon: Epsilon = 0.15,
    lam: Lambda = 1.0,
    normalize: bool = True,
    rescale: bool = True,
) -> Tensor:
    """DELLA (Deep et al., 2024): MagPrune each task vector, elect signs, merge the agreeing."""
    deltas = sampled_task_vectors(models, base, density, epsilon, rescale, generator)
    return base + combine_task_vectors(deltas, weights, True, normalize, lam)


@merge_method("della_linear", needs_base=True, per_model=("density", "epsilon"))
def della_linear(
    models: Tensor,
    weights: Tensor,
    base: Tensor,
    generator: torch.Generator,
    density: Density = 1.0,
    epsilon: Epsilon = 0.15,
    lam: Lambda = 1.0,
    normalize: bool = False,
    rescale: bool = True,
) -> Tensor:
    """DELLA without sign election (Deep et al., 2024): MagPrune each task vector, add them."""
    deltas = sampled_task_vectors(models, base, density, epsilon, rescale, generator)
    return base + combine_task_vectors(deltas, weights, False, normalize, lam)
