"""NuSLERP: spherical interpolation of two models, or of their task vectors, by their weights."""

from __future__ import annotations

import torch
from torch import Tensor

from mergecli.errors import MergeCliError
from mergecli.merge.step import merge_method

# Below this |sin(angle)| the two vectors are colinear and interpolated linearly (mergekit's eps).
_COLINEAR_EPS = 1e-8


def nuslerp_vectors(t: float, v0: Tensor, v1: Tensor, row_wise: bool, flatten: bool) -> Tensor:
    """sin((1-t)w)/sin(w) v0 + sin(tw)/sin(w) v1, w the angle between v0 and v1.

    The vectors are the whole tensors (``flatten``), else the tensor's last axis (rows of a
    matrix), or its first axis (``row_wise``, as mergekit names it: the vectors run along axis
    0, i.e. the matrix's columns). Colinear pairs are interpolated linearly.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    # Unit vectors only for the angle; the interpolation itself mixes the unnormalised ones,
    # so their lengths are interpolated too (mergekit 0.1.5 clamps the norm at 1e-7).
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _COLINEAR_EPS**2
    # acos(0) where colinear keeps the discarded spherical branch finite.
    angle = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * angle) * v0 + torch.sin(t * angle) * v1) / torch.sin(angle)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def two_models(n: int, has_base: bool) -> str | None:
    """NuSLERP interpolates two models (or their task vectors from a base)."""
    if n == 2:
        return None
    return f"merge nuslerp: interpolates exactly two models (besides an optional base), got {n}"


@merge_method("nuslerp", model_count=two_models)
def nuslerp(
    models: Tensor,
    weights: Tensor,
    base: Tensor | None = None,
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> Tensor:
    """NuSLERP (mergekit, Goddard et al., 2024): slerp of two models at t = w_2 / (w_1 + w_2).

    With a base, the two task vectors theta_i - base are interpolated and added to the base.
    Weights summing to (nearly) 0 give t = 1/2. ``nuslerp_flatten`` (default) takes each tensor
    as one vector; without it each row (``nuslerp_row_wise``: each column) is interpolated on
    its own.
    """
    if problem := two_models(len(models), base is not None):
        raise MergeCliError(problem)
    w0, w1 = weights.tolist()
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    if base is None:
        return nuslerp_vectors(t, models[0], models[1], nuslerp_row_wise, nuslerp_flatten)
    deltas = models.sub_(base)  # the engine hands each method a fresh stack
    return base + nuslerp_vectors(t, deltas[0], deltas[1], nuslerp_row_wise, nuslerp_flatten)
