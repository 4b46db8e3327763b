"""CCA Merge (Horoi et al., 2024): align units by linear maps from canonical correlations."""

from __future__ import annotations

import torch
from torch import Tensor

from mergecli.align.activations import PairStatistics


def cca_transform(stats: PairStatistics, gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """M = S_XX^{1/2} U V^T S_YY^{-1/2} and M^-1 = S_YY^{1/2} V U^T S_XX^{-1/2}.

    U S V^T = SVD(S_XX^{-1/2} S_XY S_YY^{-1/2}); X are the reference's units, Y the other
    model's, and S_XX, S_YY carry gamma * I. M maps the other model's units into the
    reference's basis (y -> M y); the inverse is closed-form because U and V are orthogonal.
    """
    cxx, cyy, cxy = stats.covariances()
    eye = torch.eye(cxx.shape[0], dtype=cxx.dtype, device=cxx.device)
    cxx_half, cxx_inv_half = _sqrt_and_inverse_sqrt(cxx + gamma * eye)
    cyy_half, cyy_inv_half = _sqrt_and_inverse_sqrt(cyy + gamma * eye)
    u, _, vh = torch.linalg.svd(cxx_inv_half @ cxy @ cyy_inv_half)
    forward = cxx_half @ u @ vh @ cyy_inv_half
    inverse = cyy_half @ vh.T @ u.T @ cxx_inv_half
    return forward, inverse


def _sqrt_and_inverse_sqrt(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric square root and inverse square root of a positive definite matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp_min(torch.finfo(values.dtype).eps)
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T
