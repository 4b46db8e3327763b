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
from mergecli.runtime.device import one_thread

# Entries per block of rows ranked at once: the sort's keys and indices stay a few MB.
_BLOCK = 1 << 17

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
    if delta.numel() == 0:
        return delta
    # The keep probability of each rank (0 = smallest), as mergekit writes it per entry.
    m = delta.shape[1] if delta.dim() >= 2 else delta.numel()
    if m > 1:
        position = torch.arange(m, dtype=delta.dtype, device=delta.device) / (m - 1)
    else:  # mergekit divides 0 by 0 here; every entry gets the mean probability
        position = torch.full((1,), 0.5, dtype=delta.dtype, device=delta.device)
    by_rank = (density - epsilon) + 2 * epsilon * position
    before = delta.abs().sum()
    step = max(1, _BLOCK // m)
    if delta.dim() <= 2 and delta.is_contiguous() and delta.device.type == "cpu":
        # CPU draws are serial: taken block by block they are the whole tensor's draws, in the
        # same order, and no tensor-sized temporaries are needed.
        ranker = _Ranker(min(step, delta.numel() // m), m, by_rank)
        with one_thread():  # a block this size: the sort's barriers cost more than a thread
            for block in delta.view(-1, m).split(step):
                u = torch.rand(block.shape, generator=generator, out=ranker.draws(block))
                block.mul_(torch.lt(u, ranker.probability(block), out=ranker.keep(block)))
        return restore_l1(delta, before) if rescale else delta
    # Elsewhere one draw of the whole tensor in its memory order; ranks along dimension 1.
    u = torch.rand(delta.shape, generator=generator, device=delta.device)
    rows = delta.movedim(1, -1) if delta.dim() > 2 else delta.reshape(-1, m)
    flat = rows.reshape(-1, m)
    ranker = _Ranker(min(step, flat.shape[0]), m, by_rank)
    probability = torch.cat([ranker.probability(block).clone() for block in flat.split(step)])
    probability = probability.reshape(rows.shape)
    if delta.dim() > 2:
        probability = probability.movedim(-1, 1)
    delta.mul_(u < probability.reshape(delta.shape))
    return restore_l1(delta, before) if rescale else delta


class _Ranker:
    """Each entry of a block of rows (at most ``rows`` × m) given ``by_rank`` at its magnitude's
    rank in its row, equal magnitudes ranked in memory order; in buffers reused block by block
    (fresh ones would be page-faulted in for every block).

    In float32 the ranks come from one stable sort of the block as a flat integer key (the row
    number above the magnitude's bits, which order like the non-negative floats they encode):
    a radix sort, about four times faster than sorting each row of floats. Other dtypes sort
    each row.
    """

    def __init__(self, rows: int, m: int, by_rank: Tensor) -> None:
        device, dtype = by_rank.device, by_rank.dtype
        n = rows * m
        self.m = m
        self.by_rank = by_rank.repeat(rows)
        self.offsets = (torch.arange(rows, device=device) << 32).unsqueeze(1)
        self.magnitude = torch.empty(n, dtype=dtype, device=device)
        self.key = torch.empty(n, dtype=torch.int64, device=device)
        self.sorted = torch.empty(n, dtype=torch.int64, device=device)
        self.order = torch.empty(n, dtype=torch.int64, device=device)
        self.out = torch.empty(n, dtype=dtype, device=device)
        # The draws in the default dtype whatever the tensor's, as a plain torch.rand takes them.
        self.u = torch.empty(n, dtype=torch.get_default_dtype(), device=device)
        self.mask = torch.empty(n, dtype=torch.bool, device=device)

    def draws(self, block: Tensor) -> Tensor:
        return self.u[: block.numel()].view(block.shape)

    def keep(self, block: Tensor) -> Tensor:
        return self.mask[: block.numel()].view(block.shape)

    def probability(self, block: Tensor) -> Tensor:
        r, n = block.shape[0], block.numel()
        magnitude = torch.abs(block, out=self.magnitude[:n].view(block.shape))
        out = self.out[:n]
        if block.dtype == torch.float32:
            key = self.key[:n].view(block.shape)
            key.copy_(magnitude.view(torch.int32)).add_(self.offsets[:r])
            order = self.order[:n]
            torch.sort(key.view(-1), stable=True, out=(self.sorted[:n], order))
            return out.scatter_(0, order, self.by_rank[:n]).view(block.shape)
        order = magnitude.argsort(dim=1, stable=True)
        out = out.view(block.shape)
        return out.scatter_(1, order, self.by_rank[:n].view(block.shape))


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
