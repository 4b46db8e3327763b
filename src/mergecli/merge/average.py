"""Weighted averaging of model weights."""

from __future__ import annotations

import torch
from torch import Tensor

from mergecli.errors import MergeCliError
from mergecli.merge.step import merge_method


@merge_method("linear")
@merge_method("average")
def average(models: Tensor, weights: Tensor, normalize: bool = True) -> Tensor:
    """Weighted average of the models (model soups, Wortsman et al., 2022): sum_i w_i theta_i."""
    if normalize:
        total = weights.sum()
        if total == 0:
            raise MergeCliError(
                "merge average: checkpoint weights sum to 0; they cannot be normalised"
            )
        weights = weights / total
    return torch.einsum("n,n...->...", weights, models)
