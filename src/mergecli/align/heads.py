"""Permutations of attention heads: built from their parts, drawn at random, and matched.

A layer's permutation is: pi over key/value heads; per key/value head g (in the reference's
order), sigma_g over its query heads, alpha_g over query/key dimensions (identity with rotary
embeddings) and beta_g over value dimensions. As flat permutations of the four groups of an
``AttentionSpec`` (new unit u is old unit p[u]), with G query heads per key/value head:

    key[g, i]       = pi[g], alpha_g[i]
    value[g, i]     = pi[g], beta_g[i]
    query[g, r, i]  = pi[g] * G + sigma_g[r], alpha_g[i]
    output[g, r, i] = pi[g] * G + sigma_g[r], beta_g[i]

Every score q.k of a head is kept, and each head's values meet the same output columns, so the
layer computes the same function. Matching a pair of heads (Verma & Elbayad, 2024, "Merging
Text Transformer Models from Different Initializations") first matches their dimensions, then
heads by the summed cost of their matched dimensions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mergecli.align.assignment import linear_sum_assignment
from mergecli.align.groups import AttentionSpec

Costs = dict[str, np.ndarray]  # group name -> (units of A, units of B) similarity


def compose(
    attention: AttentionSpec,
    kv_perm: Tensor,
    query_perms: Tensor,
    qk_perms: Tensor,
    v_perms: Tensor,
) -> dict[str, Tensor]:
    """The four groups' flat permutations from pi (kv), sigma (kv, G), alpha (kv, dqk), beta."""
    a, g = attention, attention.group_size
    pi = kv_perm.long()
    heads = pi[:, None] * g + query_perms.long()  # (kv, G): the old query head at each place
    key = pi[:, None] * a.qk_dims + qk_perms.long()
    value = pi[:, None] * a.v_dims + v_perms.long()
    query = heads[:, :, None] * a.qk_dims + qk_perms.long()[:, None, :]
    output = heads[:, :, None] * a.v_dims + v_perms.long()[:, None, :]
    return {
        a.query: query.reshape(-1),
        a.key: key.reshape(-1),
        a.value: value.reshape(-1),
        a.output: output.reshape(-1),
    }


def random_heads(attention: AttentionSpec, generator: torch.Generator) -> dict[str, Tensor]:
    """A random permutation of the layer's heads and dimensions that keeps its function."""
    a = attention

    def perms(n: int, size: int) -> Tensor:
        return torch.stack([torch.randperm(size, generator=generator) for _ in range(n)])

    qk = torch.arange(a.qk_dims).repeat(a.kv_heads, 1)
    if not a.qk_dims_fixed:
        qk = perms(a.kv_heads, a.qk_dims)
    return compose(
        a,
        torch.randperm(a.kv_heads, generator=generator),
        perms(a.kv_heads, a.group_size),
        qk,
        perms(a.kv_heads, a.v_dims),
    )


def is_head_permutation(attention: AttentionSpec, perms: dict[str, Tensor]) -> bool:
    """Whether four flat permutations are one permutation of the layer's heads (as saved)."""
    a, g = attention, attention.group_size
    try:
        key = perms[a.key].long().reshape(a.kv_heads, a.qk_dims)
        value = perms[a.value].long().reshape(a.kv_heads, a.v_dims)
        query = perms[a.query].long().reshape(a.kv_heads, g, a.qk_dims)
    except (RuntimeError, KeyError):
        return False
    pi, alpha = key // a.qk_dims, key % a.qk_dims
    beta = value % a.v_dims
    sigma = query[:, :, 0] // a.qk_dims - pi[:, :1] * g
    if not (bool((pi == pi[:, :1]).all()) and bool((value // a.v_dims == pi[:, :1]).all())):
        return False
    if a.qk_dims_fixed and not torch.equal(alpha, torch.arange(a.qk_dims).expand_as(alpha)):
        return False
    rebuilt = compose(a, pi[:, 0], sigma, alpha, beta)
    return all(torch.equal(rebuilt[name], perms[name].long()) for name in a.groups)


def _assignment(cost: np.ndarray) -> tuple[np.ndarray, float]:
    """The permutation p maximising sum_i cost[i, p[i]], and that sum."""
    rows, cols = linear_sum_assignment(cost, maximize=True)
    return cols, float(cost[rows, cols].sum())


def _dims(cost: np.ndarray, fixed: bool) -> tuple[np.ndarray, float]:
    """Dimensions of one head matched to another's (kept in place when ``fixed``)."""
    if fixed:
        return np.arange(cost.shape[0]), float(np.trace(cost))
    return _assignment(cost)


def match_heads(attention: AttentionSpec, costs: Costs, refine: int = 2) -> dict[str, Tensor]:
    """The head permutation maximising the four groups' summed cost sum_u C[u, p(u)].

    Without grouped-query attention it is exact: each pair of heads is scored by its best
    dimension matchings (query/key, value/output), then heads are assigned by those scores.
    With several query heads per key/value head, the query heads of each pair of key/value
    heads are first paired by their own best dimension matchings, then dimensions and query
    heads are refined in turn ``refine`` times (each step can only increase the pair's score).
    """
    a, g = attention, attention.group_size
    dq, dv, kv = a.qk_dims, a.v_dims, a.kv_heads
    q = costs[a.query].reshape(kv, g, dq, kv, g, dq)
    k = costs[a.key].reshape(kv, dq, kv, dq)
    v = costs[a.value].reshape(kv, dv, kv, dv)
    o = costs[a.output].reshape(kv, g, dv, kv, g, dv)
    score = np.zeros((kv, kv))
    parts: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for x in range(kv):
        for y in range(kv):
            sigma = np.arange(g)
            if g > 1:
                pair = np.empty((g, g))
                for r in range(g):
                    for s in range(g):
                        pair[r, s] = (
                            _dims(q[x, r, :, y, s, :], a.qk_dims_fixed)[1]
                            + _dims(o[x, r, :, y, s, :], False)[1]
                        )
                sigma, _ = _assignment(pair)
            for step in range(refine + 1 if g > 1 else 1):
                qk_cost = k[x, :, y, :] + sum(q[x, r, :, y, sigma[r], :] for r in range(g))
                vo_cost = v[x, :, y, :] + sum(o[x, r, :, y, sigma[r], :] for r in range(g))
                alpha, qk_value = _dims(qk_cost, a.qk_dims_fixed)
                beta, vo_value = _dims(vo_cost, False)
                if step == refine or g == 1:
                    break
                rows = np.arange(dq)
                pair = np.array(
                    [
                        [q[x, r, rows, y, s, alpha].sum() + o[x, r, :, y, s, :][
                            np.arange(dv), beta
                        ].sum() for s in range(g)]
                        for r in range(g)
                    ]
                )  # fmt: skip
                sigma, _ = _assignment(pair)
            score[x, y] = qk_value + vo_value
            parts[x, y] = (sigma, alpha, beta)
    pi, _ = _assignment(score)
    chosen = [parts[x, int(pi[x])] for x in range(kv)]
    return compose(
        a,
        torch.as_tensor(pi),
        torch.as_tensor(np.stack([c[0] for c in chosen])),
        torch.as_tensor(np.stack([c[1] for c in chosen])),
        torch.as_tensor(np.stack([c[2] for c in chosen])),
    )


def heads_value(attention: AttentionSpec, costs: Costs, perms: dict[str, np.ndarray]) -> float:
    """sum over the four groups of C[u, p(u)]: what ``match_heads`` maximises."""
    return float(sum(costs[n][np.arange(len(perms[n])), perms[n]].sum() for n in attention.groups))
