"""Multi-SLERP: weighted spherical interpolation of any number of models."""

from __future__ import annotations

from typing import Annotated

import annotated_types
import torch
from torch import Tensor

from mergecli.errors import MergeCliError
from mergecli.merge.step import merge_method


@merge_method("multislerp")
def multislerp(
    models: Tensor,
    weights: Tensor,
    base: Tensor | None = None,
    normalize_weights: bool = True,
    eps: Annotated[float, annotated_types.Ge(0)] = 1e-8,
) -> Tensor:
    """Multi-SLERP (Goddard, 2025, goddard.blog/posts/multislerp-wow-what-a-cool-idea).

    Each tensor (with a base: each task vector theta_i - base) is one vector x_i = r_i u_i with
    |u_i| = 1. The unit vectors are averaged on the sphere by one tangent-space step: m is the
    normalised sum_i w_i u_i, the tangent v = sum_i w_i (u_i - <u_i, m> m), the point
    exp_m(v) = cos|v| m + sin|v| v/|v|; it is scaled by sum_i w_i r_i (and the base added back).
    Weights are divided by their sum when ``normalize_weights``.
    """
    if len(models) == 1:
        return models[0]
    shape = models.shape[1:]
    vectors = (models.sub_(base) if base is not None else models).reshape(len(models), -1)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = vectors.norm(dim=-1, keepdim=True)
    units = vectors / (norms + eps)
    column = weights.reshape(-1, 1)
    mean = (units * column).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if len(models) != 2:
            raise MergeCliError(
                "merge multislerp: the weighted mean of the models' directions is 0 (antipodal "
                "tensors whose weights balance out); change the weights"
            )
        # Two antipodal directions: as mergekit, fall back to the weighted sum.
        result = (vectors[0] * weights[0] + vectors[1] * weights[1]).reshape(shape)
        return result + base if base is not None else result
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * column).sum(0)
    # eps keeps sin(x)/x finite when all directions agree (tangent 0: the result is m).
    length = tangent.norm() + eps
    point = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    result = (point * (norms.squeeze(-1) * weights).sum()).reshape(shape)
    return result + base if base is not None else result
