"""CCA Merge (Horoi et al., 2024): align units by linear maps from canonical correlations."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from mergecli.align.activations import PairStatistics

# Singular values of the whitened cross-covariance below this fraction of the largest are
# "no correlation": dead units give exact zeros (~1e-17 in float64), real ones are far above.
RANK_TOL = 1e-9
# A unit whose variance is below this fraction of its mean square is constant on the data.
CONSTANT_TOL = 1e-10


def cca_transform(stats: PairStatistics, gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """M = S_XX^{1/2} U V^T S_YY^{-1/2} and M^-1 = S_YY^{1/2} V U^T S_XX^{-1/2}, in float64.

    U S V^T = SVD(S_XX^{-1/2} S_XY S_YY^{-1/2}); X are the reference's units, Y the other
    model's, and S_XX, S_YY carry gamma * I. M maps the other model's units into the
    reference's basis (y -> M y); the inverse is closed-form because U and V are orthogonal.
    Where the cross-covariance is rank-deficient (dead units) U V^T is not unique; see
    ``polar_factor`` for the one chosen.
    """
    cxx, cyy, cxy = _float64(stats).covariances()
    eye = torch.eye(cxx.shape[0], dtype=cxx.dtype, device=cxx.device)
    cxx_half, cxx_inv_half = _sqrt_and_inverse_sqrt(cxx + gamma * eye)
    cyy_half, cyy_inv_half = _sqrt_and_inverse_sqrt(cyy + gamma * eye)
    q = polar_factor(cxx_inv_half @ cxy @ cyy_inv_half)
    forward = cxx_half @ q @ cyy_inv_half
    inverse = cyy_half @ q.T @ cxx_inv_half
    return forward, inverse


def polar_factor(k: Tensor) -> Tensor:
    """U V^T of k = U S V^T, with the directions k leaves uncorrelated paired canonically.

    On the span of the nonzero singular values U V^T is unique. Its null spaces (a dead unit
    of X is a zero row of k, one of Y a zero column, and a model with more live units has
    live directions left over) may be paired by any rotation, and an SVD picks one by
    rounding: float32 and float64 statistics then give maps that differ by half their size.
    We pair them in unit order instead: each null space gets the basis that Gram-Schmidt
    makes of the unit axes projected onto it, so a dead unit of Y maps onto a dead unit of X
    (the first onto the first) and stays dead, whatever the precision.
    """
    u, s, vh = torch.linalg.svd(k)
    rank = int((s > RANK_TOL * s[0]).sum()) if s[0] > 0 else 0
    q = u[:, :rank] @ vh[:rank]
    if rank < k.shape[0]:
        eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
        null = k.shape[0] - rank
        x_null = _unit_order_basis(eye - u[:, :rank] @ u[:, :rank].T, null)
        y_null = _unit_order_basis(eye - vh[:rank].T @ vh[:rank], null)
        q = q + x_null @ y_null.T
    return q


def constant_units(stats: PairStatistics) -> tuple[int, int]:
    """How many units of X and of Y are constant on the data (dead ReLUs, for instance)."""
    s = _float64(stats)
    cxx, cyy, _ = s.covariances()
    counts = []
    for cov, total in ((cxx, s.sum_xx), (cyy, s.sum_yy)):
        mean_square = total.diagonal() / s.count
        counts.append(int((cov.diagonal() <= CONSTANT_TOL * mean_square).sum()))
    return counts[0], counts[1]


def _unit_order_basis(projector: Tensor, size: int) -> Tensor:
    """An orthonormal basis (columns) of the projector's range, from its columns (the unit
    axes projected): pivoted Gram-Schmidt, the longest residual first (ties to the lower
    unit), then sorted by the unit each vector came from. Unique up to rounding where the
    longest residual is clear, and exactly the unit axes where they lie in the range."""
    residual = projector.clone()
    vectors, pivots = [], []
    for _ in range(size):
        norms = residual.norm(dim=0)
        pivot = int(torch.nonzero(norms >= norms.max() * (1 - 1e-9))[0])
        v = residual[:, pivot] / norms[pivot]
        residual = residual - torch.outer(v, v @ residual)
        vectors.append(v)
        pivots.append(pivot)
    order = sorted(range(size), key=pivots.__getitem__)
    return torch.stack([vectors[i] for i in order], dim=1)


def _float64(stats: PairStatistics) -> PairStatistics:
    """The statistics in float64, where covariances of near-constant units keep their digits."""
    return replace(
        stats,
        sum_x=stats.sum_x.double(),
        sum_y=stats.sum_y.double(),
        sum_xx=stats.sum_xx.double(),
        sum_yy=stats.sum_yy.double(),
        sum_xy=stats.sum_xy.double(),
    )


def _sqrt_and_inverse_sqrt(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric square root and inverse square root of a positive definite matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp_min(torch.finfo(values.dtype).eps)
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T
