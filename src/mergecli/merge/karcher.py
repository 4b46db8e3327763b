"""Karcher mean: the Riemannian centre of mass of the models' directions on the unit sphere."""

from __future__ import annotations

from typing import Annotated

import annotated_types
import torch
from torch import Tensor

from mergecli.merge.step import merge_method


@merge_method("karcher")
def karcher(
    models: Tensor,
    weights: Tensor,
    base: Tensor | None = None,
    max_iter: Annotated[int, annotated_types.Ge(0)] = 10,
    tol: Annotated[float, annotated_types.Ge(0)] = 1e-5,
) -> Tensor:
    """Karcher mean (Karcher, 1977) on the sphere, scaled by the mean norm, as mergekit 0.1.5.

    Each tensor x_i = r_i u_i (|u_i| = 1). The mean direction m minimises sum_i d(m, u_i)^2
    (d the angle); starting from the normalised average of the u_i, each iteration moves m
    along v = (1/n) sum_i theta_i / sin(theta_i) (u_i - cos(theta_i) m), theta_i = angle(m, u_i),
    by m <- cos|v| m + sin|v| v/|v|, until |v| < ``tol`` or ``max_iter`` steps. The result is
    (1/n) sum_i r_i * m. All inputs weigh the same (mergekit ignores `weight` here); a base
    model, when the recipe has one, is one of the inputs (the last, as mergekit adds it).
    Tensors of norm <= ``tol`` are left out of the direction but count in the scale.
    """
    inputs = [*models, base] if base is not None else list(models)
    if len(inputs) == 1:
        return inputs[0]
    alpha = 1.0 / len(inputs)
    norms = [x.norm() for x in inputs]
    kept = [x / r for x, r in zip(inputs, norms, strict=True) if r.item() > tol]
    if not kept:
        return torch.zeros_like(inputs[0])
    share = 1.0 / len(kept)  # the kept ones' weights, renormalised (all equal)
    mean = torch.zeros_like(kept[0])
    for unit in kept:
        mean += share * unit
    mean_norm = mean.norm()
    mean = kept[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for unit in kept:
            cos = torch.dot(mean.flatten(), unit.flatten()).clamp(-1.0, 1.0)
            angle = torch.arccos(cos)
            if angle.item() < tol:
                continue  # already at m: no pull (and theta / sin(theta) is 0/0)
            # The log map of u_i at m, weighted: its length is theta_i.
            tangent += share * (angle / torch.sin(angle)) * (unit - cos * mean)
        length = tangent.norm()
        if length.item() < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        # The exponential map stays on the sphere only up to rounding.
        mean_norm = mean.norm()
        if mean_norm.item() > tol:
            mean = mean / mean_norm
    scale = sum(alpha * r for r in norms)
    return scale * mean
