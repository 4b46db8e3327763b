"""Activation matching (Li et al., 2016; Ainsworth et al., 2023): pair units that fire alike."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch

from mergecli.align.activations import PairStatistics
from mergecli.align.assignment import linear_sum_assignment
from mergecli.align.groups import PermutationSpec
from mergecli.align.heads import match_heads
from mergecli.align.permute import Permutations, StateDict, apply_permutations
from mergecli.align.weight_matching import weight_matching


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


def match_unread_heads(
    spec: PermutationSpec,
    perms: Permutations,
    stats: dict[str, PairStatistics],
    reference: StateDict,
    other: StateDict,
) -> Permutations:
    """``perms`` with the heads of every attention layer whose activations could not all be
    read (projections inside a module that is not a leaf, as nn.MultiheadAttention's packed
    in_proj) matched by weight matching instead, the other groups' permutations applied first."""
    unread = tuple(a for a in spec.attention if not all(n in stats for n in a.groups))
    if not unread:
        return perms
    names = {name for a in unread for name in a.groups}
    moved = apply_permutations(other, spec, {n: p for n, p in perms.items() if n not in names})
    layers = replace(
        spec, groups=tuple(g for g in spec.groups if g.name in names), attention=unread
    )
    return {**perms, **weight_matching(layers, reference, moved)}
