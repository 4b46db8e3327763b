"""SCE: select high-variance task-vector entries, weigh models by their energy, erase minority
signs."""

from __future__ import annotations

from typing import Annotated

import annotated_types
import torch
from torch import Tensor

from mergecli.merge.sparsify import kth_largest
from mergecli.merge.step import merge_method

SelectTopk = Annotated[float, annotated_types.Ge(0), annotated_types.Le(1)]


def keep_top_variance(deltas: Tensor, select_topk: float) -> Tensor:
    """Zero (in place; returns ``deltas``) every entry outside the ``select_topk`` fraction of
    positions whose task-vector values vary most across the models, as mergekit 0.1.5's
    ``sce_mask``: var_j = (1/N) sum_i (d_ij - mean_i d_ij)^2, k = int(select_topk * number of
    positions with var_j != 0), the k largest var_j kept (k = 0: nothing is kept).

    Of equal variances at the threshold the first positions in memory order are kept (mergekit
    leaves that to ``torch.topk``), so the same inputs always keep the same entries.
    """
    if select_topk >= 1:
        return deltas
    variance = deltas.var(dim=0, unbiased=False).reshape(-1)
    k = int(select_topk * int(torch.count_nonzero(variance)))
    if k == 0:
        return deltas.zero_()
    threshold = kth_largest(variance, k)
    keep = variance > threshold
    ties = (variance == threshold).nonzero().reshape(-1)
    keep[ties[: k - int(torch.count_nonzero(keep))]] = True
    return deltas.mul_(keep.reshape(deltas.shape[1:]))


@merge_method("sce", needs_base=True)
def sce(
    models: Tensor,
    weights: Tensor,
    base: Tensor,
    select_topk: SelectTopk = 1.0,
) -> Tensor:
    """SCE (Wan et al., 2024, FuseChat): select, calculate, erase; as mergekit 0.1.5's ``sce``.

    With task vectors d_i = theta_i - base (after ``keep_top_variance``), each model weighs
    c_i = mean(d_i^2) / sum_k mean(d_k^2) (1/N each when that sum is below 1e-6); per entry the
    elected sign is that of sum_i d_i (+ for 0), and only entries of that sign count (a zero
    never does): base + sum_i c_i m_i d_i / max(sum_i c_i m_i, 1e-6). The recipe's ``weight``s
    play no part, as in mergekit (the coefficients come from the task vectors themselves).
    """
    deltas = keep_top_variance(models.sub_(base), select_topk)  # a fresh stack: ours to change
    energy = deltas.square().reshape(len(deltas), -1).mean(dim=1)
    total = energy.sum().item()
    # mergekit's fallback for models (all but) identical to the base: equal coefficients.
    coefficients = torch.full_like(energy, 1 / len(energy)) if abs(total) < 1e-6 else energy / total
    column = coefficients.reshape(-1, *([1] * (deltas.dim() - 1)))
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agreeing = (deltas.sign() == elected) * column
    merged = deltas.mul_(agreeing).sum(dim=0)
    return base + merged / agreeing.sum(dim=0).clamp_min(1e-6)
