"""Activation matching (Li et al., 2016; Ainsworth et al., 2023): pair units that fire alike."""

from __future__ import annotations

from typing import Literal

import torch
from scipy.optimize import linear_sum_assignment

from mergecli.align.activations import PairStatistics
from mergecli.align.permute import Permutations


def match_activations(
    stats: dict[str, PairStatistics],
    statistic: Literal["correlation", "cross_moment"] = "correlation",
) -> Permutations:
    """One assignment per group maximising sum_i S[i, p(i)] with S the A-B unit similarity."""
    perms = {}
    for name, s in stats.items():
        similarity = s.correlation() if statistic == "correlation" else s.cross_moment()
        _, cols = linear_sum_assignment(similarity.cpu().numpy(), maximize=True)
        perms[name] = torch.as_tensor(cols, dtype=torch.int64)
    return perms
