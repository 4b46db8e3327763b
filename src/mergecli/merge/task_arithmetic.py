"""Task arithmetic and its sparsified, sign-elected relatives (TIES, DARE)."""

from __future__ import annotations

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
    """sum_i w_i d_i (over the entries agreeing with the elected sign), optionally / sum_i w_i."""
    weights = weights.reshape(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * weights
    if elect_sign:
        # The sign of the weighted sum wins per entry; entries of the other sign are dropped.
        elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
        agree = (weighted.sign() == elected).to(weighted.dtype)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(dim=0)
        divisor = weights.sum()
        divisor = divisor if divisor.abs() >= 1e-8 else torch.ones_like(divisor)
    if normalize:
        mixed = mixed / divisor
    return mixed * lam


@merge_method("task_arithmetic", needs_base=True)
def task_arithmetic(
    models: Tensor, weights: Tensor, base: Tensor, lam: Lambda = 1.0, normalize: bool = False
) -> Tensor:
    """Task arithmetic (Ilharco et al., 2023): base + lambda * sum_i w_i (theta_i - base)."""
    return base + combine_task_vectors(models - base, weights, False, normalize, lam)


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
    deltas = torch.stack([keep_top_magnitude(d, density) for d in models - base])
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
    deltas = torch.stack([drop_and_rescale(d, density, generator) for d in models - base])
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
    deltas = torch.stack([drop_and_rescale(d, density, generator) for d in models - base])
    return base + combine_task_vectors(deltas, weights, True, normalize, lam)
