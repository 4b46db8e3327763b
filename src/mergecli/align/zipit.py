"""ZipIt! (Stoica et al., 2024): merge features across *and within* models by greedy matching."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Zip:
    """A zip of ``models`` feature spaces of ``width`` units each into one of ``width``.

    ``merge`` (width, models * width) averages each merged feature's members; ``unmerge``
    (models * width, width) sends a merged feature back to every member (0/1). Features are
    numbered model by model: model m's unit i is ``m * width + i``.
    """

    merge: Tensor
    unmerge: Tensor
    models: int
    width: int
    within_merges: tuple[int, ...]  # same-model merges made, per model

    def transform(self, model: int) -> Tensor:
        """Model ``model``'s (2, width, width) map as ``align`` stores it: ``models * M_m``
        then ``U_m``. Mapping each model (W_m -> models M_m W_m U_m, a layer's input by U_m)
        and averaging with equal weights gives the zipped layer sum_m M_m W_m U_m."""
        block = slice(model * self.width, (model + 1) * self.width)
        return torch.stack((self.models * self.merge[:, block], self.unmerge[block, :]))


def correlation_from_covariance(covariance: Tensor, eps: float = 1e-7) -> Tensor:
    """Pearson correlations from a covariance; units constant on the data correlate 0."""
    std = covariance.diagonal().clamp_min(0).sqrt()
    return covariance / torch.outer(std, std).clamp_min(eps)


def zip_features(correlation: Tensor, models: int, alpha: float, beta: float) -> Zip:
    """ZipIt!'s greedy matching (Stoica et al., 2024, Sec. 4.3) of ``models`` feature spaces.

    Until one model's width of features is left: merge the two most correlated features
    (a merged feature scores ``alpha * min`` of its parts' scores with any other, so it grows
    again only when that still wins; ``alpha <= 0`` keeps it from every model it contains).
    Two features of one model may merge: each model has a budget of
    ``floor((total merges // models) * beta)`` such merges, after which its features no longer
    score against each other. A merged feature belongs to the model of its lowest-numbered
    member (the authors' bookkeeping). Ties go to the first pair in row-major order.
    """
    total = correlation.shape[0]
    width = total // models
    scores = correlation.double().cpu()  # a sequential loop of small steps: the CPU's work
    scores = (scores + scores.T) / 2  # exactly symmetric: a pair has one score, as in the paper
    scores.fill_diagonal_(-torch.inf)
    members = [[i] for i in range(total)]  # clusters, by the index of their lowest member
    owner = [i // width for i in range(total)]
    budget = [int((total - width) // models * beta + 1e-4)] * models
    within = [0] * models
    alive = torch.ones(total, dtype=torch.bool)
    for model in range(models):
        if budget[model] <= 0:
            _forbid_within(scores, owner, alive, model)
    for _ in range(total - width):
        best = int(scores.argmax())
        a, b = divmod(best, total)
        if not torch.isfinite(scores[a, b]):
            break  # nothing left may merge (alpha <= 0 with few models): no more than this
        keep, drop = min(a, b), max(a, b)
        same_model = owner[keep] == owner[drop]
        merged = torch.minimum(scores[keep], scores[drop])
        if alpha > 0:
            merged = merged * alpha
        else:
            merged[[i for i in range(total) if owner[i] in (owner[keep], owner[drop])]] = -torch.inf
        merged[keep] = -torch.inf
        scores[keep], scores[:, keep] = merged, merged
        scores[drop], scores[:, drop] = -torch.inf, -torch.inf
        alive[drop] = False
        members[keep] += members[drop]
        if same_model:
            origin = owner[keep]
            within[origin] += 1
            budget[origin] -= 1
            if budget[origin] <= 0:
                _forbid_within(scores, owner, alive, origin)
    clusters = [sorted(members[i]) for i in range(total) if alive[i]]
    unmerge = torch.zeros(total, len(clusters), dtype=torch.float64)
    for column, cluster in enumerate(clusters):
        unmerge[cluster, column] = 1.0
    merge = (unmerge / unmerge.sum(0)).T
    return Zip(merge, unmerge, models, width, tuple(within))


def _forbid_within(scores: Tensor, owner: list[int], alive: Tensor, model: int) -> None:
    """No more merges between two live features (or merged features) that ``model`` owns."""
    mine = torch.tensor([o == model for o in owner]) & alive
    scores[mine[:, None] & mine[None, :]] = -torch.inf
