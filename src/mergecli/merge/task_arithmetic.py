"""Task arithmetic and its sparsified, sign-elected relatives (TIES, DARE)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import annotated_types
import torch
from pydantic import Field
from torch import Tensor

from mergecli.merge.sparsify import drop_and_rescale, keep_top_magnitude
from mergecli.merge.step import merge_method

Lambda = Annotated[float, Field(alias="lambda")]
Density = Annotated[float, annotated_types.Gt(0), annotated_types.Le(1)]
# The engine passes one density per model when checkpoints set their own.
Densities = Density | list[float]
# Entries per block of combine_task_vectors: N x 64k float32 stays within a core's cache.
_BLOCK = 1 << 16


def combine_task_vectors(
    deltas: Tensor, weights: Tensor, elect_sign: bool, normalize: bool, lam: float
) -> Tensor:
    """sum_i w_i d_i (over the entries agreeing with the elected sign), optionally / sum_i w_i.

    ``deltas`` (N, ...) is overwritten. Every step is elementwise along the entries, so they are
    taken in column blocks that stay in the CPU's cache: the temporaries of one block are
    small, and a large embedding costs no more passes over main memory than its inputs.
    """
    shape = deltas.shape[1:]
    flat = deltas.reshape(len(deltas), -1)
    weights = weights.reshape(-1, 1)
    out = torch.empty(flat.shape[1], dtype=flat.dtype, device=flat.device)
    total = weights.sum()
    total = total if total.abs() >= 1e-8 else torch.ones_like(total)
    for start in range(0, flat.shape[1], _BLOCK):
        weighted = flat[:, start : start + _BLOCK].mul_(weights)
        if elect_sign:
            # The sign of the weighted sum wins per entry; entries of the other sign are dropped.
            # A sum of 0 elects +; flipping each entry by the elected sign makes the agreeing
            # ones exactly the positive ones (sign flips are exact, so the sums are too).
            total_sign = weighted.sum(dim=0)
            sign = torch.ones_like(total_sign).copysign_(total_sign)
            agreeing = (weighted * sign).clamp_min_(0)
            mixed = agreeing.sum(dim=0).mul_(sign)
            if normalize:
                divisor = (agreeing > 0).float().mul_(weights).sum(dim=0)
                mixed = mixed / divisor.masked_fill_(divisor == 0, 1)
        else:
            mixed = weighted.sum(dim=0)
            if normalize:
                mixed = mixed / total
        out[start : start + _BLOCK] = mixed * lam
    return out.reshape(shape)


def task_vectors(
    models: Tensor, base: Tensor, sparsify: Callable[[Tensor, float], Tensor], density: Densities
) -> Tensor:
    """theta_i - base for every model, each sparsified at its density; in place in ``models``."""
    deltas = models.sub_(base)  # the engine hands each method a fresh stack
    densities = density if isinstance(density, list) else [density] * len(deltas)
    for delta, own in zip(deltas, densities, strict=True):
        sparsify(delta, own)  # in place
    return deltas


@merge_method("task_arithmetic", needs_base=True)
def task_arithmetic(
    models: Tensor, weights: Tensor, base: Tensor, lam: Lambda = 1.0, normalize: bool = False
) -> Tensor:
    """Task arithmetic (Ilharco et al., 2023): base + lambda * sum_i w_i (theta_i - base)."""
    return base + combine_task_vectors(models.sub_(base), weights, False, normalize, lam)


@merge_method("ties", needs_base=True, per_model=("density",))
def ties(
    models: Tensor,
    weights: Tensor,
    base: Tensor,
    density: Density = 1.0,
    lam: Lambda = 1.0,
    normalize: bool = True,
) -> Tensor:
    """TIES (Yadav et al., 2023): trim each task vector, elect signs, average the agreeing."""
    deltas = task_vectors(models, base, keep_top_magnitude, density)
    return base + combine_task_vectors(deltas, weights, True, normalize, lam)


def ties_coefficients(
    models: Tensor,
    weights: Tensor,
    base: Tensor,
    density: Densities = 1.0,
    lam: float = 1.0,
    normalize: bool = True,
) -> Tensor:
    """TIES (Yadav et al., 2023) as one weight per model and entry: c_i = lambda w_i m_i / D,
    m_i = 1 where model i's entry survives the trim and agrees with the elected sign, D the sum
    of the agreeing w_i (1 without ``normalize``), so that base + sum_i c_i (theta_i - base)
    is ``ties``'s output. ``models`` (N, ...) is overwritten, as ``ties`` overwrites it."""
    deltas = task_vectors(models, base, keep_top_magnitude, density)
    column = weights.reshape(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas.mul_(column)
    # The same election as combine_task_vectors: the weighted sum's sign (0 elects +).
    sign = torch.ones_like(weighted[0]).copysign_(weighted.sum(dim=0))
    agreeing = (weighted * sign) > 0
    coefficients = agreeing * column
    if normalize:
        divisor = coefficients.sum(dim=0)
        coefficients = coefficients / divisor.masked_fill_(divisor == 0, 1)
    return coefficients * lam


@merge_method("dare_linear", needs_base=True, per_model=("density",))
def dare_linear(
    models: Tensor,
    weights: Tensor,
    base: Tensor,
    generator: torch.Generator,
    density: Density = 1.0,
    lam: Lambda = 1.0,
    normalize: bool = False,
) -> Tensor:
    """DARE (Yu et al., 2024): drop task-vector entries at random, rescale, add linearly."""
    deltas = task_vectors(models, base, lambda d, p: drop_and_rescale(d, p, generator), density)
    return base + combine_task_vectors(deltas, weights, False, normalize, lam)


@merge_method("dare_ties", needs_base=True, per_model=("density",))
def dare_ties(
    models: Tensor,
    weights: Tensor,
    base: Tensor,
    generator: torch.Generator,
    density: Density = 1.0,
    lam: Lambda = 1.0,
    normalize: bool = False,
) -> Tensor:
    """DARE with TIES sign election (Yu et al., 2024; Yadav et al., 2023)."""
    deltas = task_vectors(models, base, lambda d, p: drop_and_rescale(d, p, generator), density)
    return base + combine_task_vectors(deltas, weights, True, normalize, lam)
