"""Activation matching (Li et al., 2016; Ainsworth et al., 2023): pair units that fire alike."""

from __future__ import annotations

from typing import Literal

import torch
from scipy.optimize import linear_sum_assignment

from mergecli.align.activations import PairStatistics
from mergecli.align.groups import PermutationSpec
from mergecli.align.heads import match_heads
from mergecli.align.permute import Permutations


def match_activations(
    stats: dict[str, PairStatistics],
    statistic: Literal["correlation", "cross_moment"] = "correlation",
    spec: PermutationSpec | None = None,
) -> Permutations:
    """One assignment per group maximising sum_i S[i, p(i)] with S the A-B unit similarity;
    an attention layer's groups (``spec``) get one permutation of its heads (``align.heads``).
    Groups of ``spec`` without statistics (no activation to read) keep their order."""
    similarities = {
        name: (s.correlation() if statistic == "correlation" else s.cross_moment()).cpu().numpy()
        for name, s in stats.items()
    }
    perms = {}
    heads = spec.attention_of() if spec is not None else {}
    for name, similarity in similarities.items():
        if name in heads:
            continue
        _, cols = linear_sum_assignment(similarity, maximize=True)
        perms[name] = torch.as_tensor(cols, dtype=torch.int64)
    for attention in spec.attention if spec is not None else ():
        if all(name in similarities for name in attention.groups):
            perms.update(match_heads(attention, similarities))
    for group in spec.groups if spec is not None else ():
        perms.setdefault(group.name, torch.arange(group.size))
    return perms
