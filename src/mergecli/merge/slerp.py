"""Spherical linear interpolation of two models, tensor by tensor."""

from __future__ import annotations

from typing import Annotated

import annotated_types
import torch
from torch import Tensor

from mergecli.errors import MergeCliError
from mergecli.merge.step import merge_method


def two_inputs(n: int, has_base: bool) -> str | None:
    """SLERP joins two points: a base and one model, or two models."""
    if n + has_base == 2:
        return None
    return (
        f"merge slerp: interpolates exactly two models (a base and one model, or two "
        f"models), got {n + has_base}"
    )


@merge_method("slerp", model_count=two_inputs)
def slerp(
    models: Tensor,
    weights: Tensor,
    base: Tensor | None = None,
    t: Annotated[float, annotated_types.Ge(0), annotated_types.Le(1)] = 0.5,
    dot_threshold: Annotated[float, annotated_types.Gt(0), annotated_types.Le(1)] = 0.9995,
) -> Tensor:
    """SLERP (Shoemake, 1985) per tensor: sin((1-t)w)/sin(w) v0 + sin(tw)/sin(w) v1.

    v0 is the base (or the first model), v1 the other, each tensor taken as one vector; w is
    the angle between them. Nearly colinear or antipodal tensors (|cos w| > dot_threshold) are
    interpolated linearly. t = 0 gives v0, t = 1 gives v1.
    """
    pair = [base, *models] if base is not None else list(models)
    if problem := two_inputs(len(models), base is not None):
        raise MergeCliError(problem)
    v0, v1 = pair
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    norm_a = a.norm(dim=1, keepdim=True)
    norm_b = b.norm(dim=1, keepdim=True)
    norm_a = torch.where(norm_a > 1e-8, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > 1e-8, norm_b, torch.ones_like(norm_b))
    dot = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    angle = torch.acos(torch.where(linear, torch.zeros_like(dot), dot))
    sin_angle = torch.sin(angle)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * angle) / sin_angle)
    coef_b = torch.where(linear, t, torch.sin(t * angle) / sin_angle)
    return (coef_a * a + coef_b * b).reshape(v0.shape)
