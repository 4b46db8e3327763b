"""nuslerp, multislerp, karcher and nearswap against formulas written out here, and invariants."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mergecli.errors import MergeCliError
from mergecli.merge.karcher import karcher
from mergecli.merge.multislerp import multislerp
from mergecli.merge.nearswap import nearswap
from mergecli.merge.nuslerp import nuslerp

# float64 inputs throughout: the formulas below are compared at a tight tolerance.
TOL = {"atol": 1e-10, "rtol": 1e-10}


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def slerp_by_hand(t: float, a: Tensor, b: Tensor) -> Tensor:
    """Shoemake's slerp of two vectors (any shape, taken whole)."""
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    w = math.acos(max(-1.0, min(1.0, cos)))
    return math.sin((1 - t) * w) / math.sin(w) * a + math.sin(t * w) / math.sin(w) * b


def w(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


# nuslerp


def test_nuslerp_weights_give_the_endpoints_and_slerp_between() -> None:
    a, b = randn(2, 5, 7).unbind()
    torch.testing.assert_close(nuslerp(torch.stack([a, b]), w(1, 0)), a, **TOL)
    torch.testing.assert_close(nuslerp(torch.stack([a, b]), w(0, 2)), b, **TOL)
    # t = w_2 / (w_1 + w_2) = 0.3
    got = nuslerp(torch.stack([a, b]), w(0.7, 0.3))
    torch.testing.assert_close(got, slerp_by_hand(0.3, a, b), **TOL)
    # Weights summing to 0: t = 1/2.
    got = nuslerp(torch.stack([a, b]), w(1, -1))
    torch.testing.assert_close(got, slerp_by_hand(0.5, a, b), **TOL)


def test_nuslerp_of_task_vectors_around_a_base() -> None:
    base, a, b = randn(3, 4, 6).unbind()
    got = nuslerp(torch.stack([a, b]), w(1, 3), base=base)
    torch.testing.assert_close(got, base + slerp_by_hand(0.75, a - base, b - base), **TOL)


def test_nuslerp_rows_and_columns() -> None:
    a, b = randn(2, 4, 6, seed=1).unbind()
    rows = nuslerp(torch.stack([a, b]), w(0.6, 0.4), nuslerp_flatten=False)
    expected = torch.stack([slerp_by_hand(0.4, a[i], b[i]) for i in range(4)])
    torch.testing.assert_close(rows, expected, **TOL)
    # mergekit's row_wise: the vectors run along axis 0 (the matrix's columns).
    columns = nuslerp(
        torch.stack([a, b]), w(0.6, 0.4), nuslerp_flatten=False, nuslerp_row_wise=True
    )
    expected = torch.stack([slerp_by_hand(0.4, a[:, j], b[:, j]) for j in range(6)], dim=1)
    torch.testing.assert_close(columns, expected, **TOL)
    # Flattening wins over row_wise, as in mergekit.
    flat = nuslerp(torch.stack([a, b]), w(0.6, 0.4), nuslerp_row_wise=True)
    torch.testing.assert_close(flat, slerp_by_hand(0.4, a, b), **TOL)


def test_nuslerp_colinear_is_linear_and_identical_models_stay() -> None:
    a = randn(3, 5, seed=2)
    torch.testing.assert_close(nuslerp(torch.stack([a, 2 * a]), w(3, 1)), 1.25 * a, **TOL)
    torch.testing.assert_close(nuslerp(torch.stack([a, a]), w(1, 1)), a, **TOL)
    with pytest.raises(MergeCliError, match="exactly two models"):
        nuslerp(randn(3, 4), w(1, 1, 1))


# multislerp


def multislerp_by_hand(vectors: list[Tensor], weights: list[float]) -> Tensor:
    """mergekit's Multi-SLERP in closed form: its tangent step sum_i w_i (u_i - <u_i, m> m)
    is 0 when m is the normalised sum_i w_i u_i, so the result is that direction scaled by the
    weighted mean norm sum_i w_i |x_i| (weights normalised to sum 1)."""
    total = sum(weights)
    weights = [x / total for x in weights]
    direction = sum(wi * x / x.norm() for wi, x in zip(weights, vectors, strict=True))
    scale = sum(wi * x.norm() for wi, x in zip(weights, vectors, strict=True))
    return direction / direction.norm() * scale


def test_multislerp_is_the_normalised_mean_direction_scaled() -> None:
    models = randn(3, 4, 5, seed=3)
    # eps (1e-8, added to norms of about 4) moves the result by about 1e-8 relative.
    near = {"atol": 1e-7, "rtol": 1e-7}
    got = multislerp(models.clone(), w(0.5, 0.3, 0.2))
    torch.testing.assert_close(got, multislerp_by_hand(list(models), [0.5, 0.3, 0.2]), **near)
    # Around a base: the same of the task vectors, added to the base.
    base = randn(4, 5, seed=4)
    got = multislerp(models.clone(), w(2, 1, 1), base=base)
    expected = base + multislerp_by_hand(list(models - base), [2, 1, 1])
    torch.testing.assert_close(got, expected, **near)


def test_multislerp_of_two_equal_norm_models_at_equal_weights_is_slerp_at_half() -> None:
    a, b = randn(2, 6, 3, seed=5).unbind()
    b = b * (a.norm() / b.norm())
    got = multislerp(torch.stack([a, b]), w(1, 1))
    torch.testing.assert_close(got, slerp_by_hand(0.5, a, b), atol=1e-7, rtol=1e-7)


def test_multislerp_invariants_and_antipodes() -> None:
    a = randn(4, 4, seed=6)
    torch.testing.assert_close(multislerp(torch.stack([a, a, a]), w(1, 2, 3)), a, **TOL)
    torch.testing.assert_close(multislerp(a[None].clone(), w(5)), a, **TOL)
    # One weight 1, the others 0: that model.
    models = randn(3, 4, 4, seed=7)
    torch.testing.assert_close(multislerp(models.clone(), w(0, 1, 0)), models[1], **TOL)
    # Two antipodal tensors of equal weight: the weighted sum (mergekit's fallback), here 0.
    got = multislerp(torch.stack([a, -a]), w(1, 1))
    torch.testing.assert_close(got, torch.zeros_like(a), **TOL)
    with pytest.raises(MergeCliError, match="weighted mean of the models' directions is 0"):
        multislerp(torch.stack([a, -a, a, -a]), w(1, 1, 1, 1))


# karcher


def test_karcher_of_planar_directions_is_the_mean_angle() -> None:
    # Unit vectors in a plane at angles phi_i (within a half turn): the point of the circle
    # minimising sum_i (phi - phi_i)^2 is the arithmetic mean angle.
    angles = [0.0, 0.5, 1.4]
    norms = [1.0, 2.0, 3.0]
    vectors = [r * torch.tensor([math.cos(p), math.sin(p)], dtype=torch.float64)
               for r, p in zip(norms, angles, strict=True)]  # fmt: skip
    got = karcher(torch.stack(vectors), w(1, 1, 1), max_iter=100, tol=1e-12)
    mean = sum(angles) / 3
    expected = sum(norms) / 3 * torch.tensor([math.cos(mean), math.sin(mean)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
    # The normalised Euclidean mean (its start) is not there yet: the iterations matter.
    start = karcher(torch.stack(vectors), w(1, 1, 1), max_iter=0)
    assert (start - expected).abs().max() > 1e-3


def test_karcher_of_two_is_slerp_at_half_and_ignores_weights() -> None:
    a, b = randn(2, 5, 5, seed=8).unbind()
    b = b * (a.norm() / b.norm())
    torch.testing.assert_close(karcher(torch.stack([a, b]), w(1, 1)), slerp_by_hand(0.5, a, b))
    torch.testing.assert_close(karcher(torch.stack([a, b]), w(9, 1)), slerp_by_hand(0.5, a, b))


def test_karcher_base_is_one_input_and_invariants() -> None:
    models = randn(3, 3, 4, seed=9)
    with_base = karcher(models[:2].clone(), w(1, 1), base=models[2])
    torch.testing.assert_close(with_base, karcher(models.clone(), w(1, 1, 1)), **TOL)
    a = models[0]
    torch.testing.assert_close(karcher(torch.stack([a, a, a]), w(1, 1, 1)), a, **TOL)
    zeros = torch.zeros(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(karcher(zeros, w(1, 1)), zeros[0], **TOL)
    # A zero tensor takes no part in the direction but halves the scale.
    got = karcher(torch.stack([a, torch.zeros_like(a)]), w(1, 1))
    torch.testing.assert_close(got, a / 2, **TOL)


# nearswap


def test_nearswap_entry_by_entry() -> None:
    base = randn(6, 5, seed=10)
    other = base + 0.1 * randn(6, 5, seed=11)
    t = 0.05
    got = nearswap(other[None].clone(), w(1), base, t=t)
    expected = base.clone()
    for i in range(6):
        for j in range(5):
            diff = abs(float(other[i, j] - base[i, j]))
            if diff <= t:
                expected[i, j] = other[i, j]  # near: swapped in
            else:
                expected[i, j] = base[i, j] + t / diff * (other[i, j] - base[i, j])
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(nearswap(other[None].clone(), w(1), base, t=0.0), base, **TOL)
    torch.testing.assert_close(nearswap(other[None].clone(), w(1), base, t=1e9), other, **TOL)
    with pytest.raises(MergeCliError, match="exactly one model besides the base"):
        nearswap(torch.stack([other, other]), w(1, 1), base, t=t)
