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


def combine_task_vectors(
    deltas: Tensor, weights: Tensor, elect_sign: bool, normalize: bool, lam: float
) -> Tensor:
    """sum_i w_i d_i (over the entries agreeing with the elected sign), optionally / sum_i w_i.

    ``deltas`` (N, ...) is overwritten: large tensors (embeddings) are merged in the memory of
    their inputs plus a few single-model buffers, not several stacks of temporaries.
    """
    weights = weights.reshape(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas.mul_(weights)
    if elect_sign:
        # The sign of the weighted sum wins per entry; entries of the other sign are dropped.
        positive = weighted.sum(dim=0) >= 0
        mixed = torch.zeros_like(weighted[0])
        divisor = torch.zeros_like(weighted[0])
        for d, w in zip(weighted, weights, strict=True):
            agree = torch.where(positive, d > 0, d < 0)
            mixed.add_(torch.where(agree, d, 0.0))
            divisor.add_(agree * w)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = weights.sum()
        divisor = divisor if divisor.abs() >= 1e-8 else torch.ones_like(divisor)
    if normalize:
        mixed = mixed / divisor
    return mixed * lam


def task_vectors(models: Tensor, base: Tensor, sparsify: Callable[[Tensor], Tensor]) -> Tensor:
    """theta_i - base for every model, each sparsified; computed in place in ``models``."""
    deltas = models.sub_(base)  # the engine hands each method a fresh stack
    for i in range(len(deltas)):
        deltas[i] = sparsify(deltas[i])
    return deltas


@merge_method("task_arithmetic", needs_base=True)
def task_arithmetic(
    models: Tensor, weights: Tensor, base: Tensor, lam: Lambda = 1.0, normalize: bool = False
) -> Tensor:
    """Task arithmetic (Ilharco et al., 2023): base + lambda * sum_i w_i (theta_i - base)."""
    return base + combine_task_vectors(models.sub_(base), weights, False, normalize, lam)


@merge_method("ties", needs_base=True)
def ties(
    models: Tensor,
    weights: Tensor,
    base: Tensor,
    density: Density = 1.0,
    lam: Lambda = 1.0,
    normalize: bool = True,
) -> Tensor:
    """TIES (Yadav et al., 2023): trim each task vector, elect signs, average the agreeing."""
    deltas = task_vectors(models, base, lambda d: keep_top_magnitude(d, density))
    return base + combine_task_vectors(deltas, weights, True, normalize, lam)


@merge_method("dare_linear", needs_base=True)
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
    deltas = task_vectors(models, base, lambda d: drop_and_rescale(d, density, generator))
    return base + combine_task_vectors(deltas, weights, False, normalize, lam)


@merge_method("dare_ties", needs_base=True)
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
    deltas = task_vectors(models, base, lambda d: drop_and_rescale(d, density, generator))
    return base + combine_task_vectors(deltas, weights, True, normalize, lam)
