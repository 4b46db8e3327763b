"""Weighted averaging of model weights: one tensor (the merge method), or whole state dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mergecli.errors import MergeCliError
from mergecli.merge.step import merge_method
from mergecli.state import StateDict


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


def average_state_dicts(models: Sequence[Mapping[str, Tensor]]) -> StateDict:
    """Uniform soup (Wortsman et al., 2022) of whole state dicts, in memory: floating tensors
    averaged in float32, the others (BatchNorm counters) from the first model.

    A plain mean rather than ``average`` with equal weights: the analyses have always measured
    this one, and einsum's 1/N weights round differently from N > 2 models on. The recipe's
    weighted average runs through the merge engine instead (`merge_state_dicts`).
    """
    first = models[0]
    return {
        name: torch.stack([m[name].float() for m in models]).mean(0).to(t.dtype)
        if t.is_floating_point()
        else t
        for name, t in first.items()
    }
