"""Model Stock, Model Breadcrumbs, DELLA and SCE against formulas written out here from the papers
(and mergekit 0.1.5's reading of them), and the invariants they must keep."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mergecli.errors import MergeCliError, RecipeError
from mergecli.merge.breadcrumbs import breadcrumbs, breadcrumbs_ties, keep_between_outliers
from mergecli.merge.della import della, della_linear, magprune
from mergecli.merge.model_stock import model_stock, model_stock_streamed
from mergecli.merge.sce import keep_top_variance, sce
from mergecli.merge.task_arithmetic import task_arithmetic, ties

TOL = {"rtol": 1e-5, "atol": 1e-6}


def fine_tunes(n: int, shape: tuple[int, ...], seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, base + torch.randn((n, *shape), generator=generator)


def cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten().tolist(), b.flatten().tolist()
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# Model Stock


@pytest.mark.parametrize("n", [2, 3, 4])
def test_model_stock_is_the_papers_interpolation(n: int) -> None:
    base, models = fine_tunes(n, (5, 6))
    offsets = [m - base for m in models]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = sum(cosine(offsets[i], offsets[j]) for i, j in pairs) / len(pairs)
    t = n * cos / (1 + (n - 1) * cos)
    expected = t * models.mean(dim=0) + (1 - t) * base
    got = model_stock(models.clone(), torch.ones(n), base)
    torch.testing.assert_close(got, expected, **TOL)


def test_model_stock_filter_wise_takes_each_row_apart() -> None:
    base, models = fine_tunes(3, (4, 7))
    got = model_stock(models.clone(), torch.ones(3), base, filter_wise=True)
    for row in range(4):
        expected = model_stock(models[:, row].clone(), torch.ones(3), base[row])
        torch.testing.assert_close(got[row], expected, **TOL)
    # A 1-D tensor is one row: filter-wise or not, the same.
    base, models = fine_tunes(3, (9,))
    torch.testing.assert_close(
        model_stock(models.clone(), torch.ones(3), base, filter_wise=True),
        model_stock(models.clone(), torch.ones(3), base),
        **TOL,
    )


def test_model_stock_invariants() -> None:
    base, (a,) = fine_tunes(1, (3, 4))
    # Identical fine-tunes (cos 1, t 1) give the fine-tune; weights play no part.
    same = torch.stack([a, a])
    torch.testing.assert_close(model_stock(same, torch.tensor([0.9, 0.1]), base), a, **TOL)
    # Orthogonal offsets (cos 0, t 0) give the base.
    offset = torch.zeros(3, 4)
    offset[0, 0], other = 1.0, torch.zeros(3, 4)
    other[1, 1] = 1.0
    orthogonal = torch.stack([base + offset, base + other])
    torch.testing.assert_close(model_stock(orthogonal, torch.ones(2), base), base)
    # Opposite offsets of two models (1 + cos = 0): no finite t, the base is kept.
    opposite = torch.stack([base + offset, base - offset])
    torch.testing.assert_close(model_stock(opposite, torch.ones(2), base), base)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_stock_streamed_is_the_same_formula(
    n: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's streamed form (inputs as stored, in pieces, into the output) against the
    paper's interpolation computed here, with pieces and dot blocks that do not divide the
    tensor, so that every boundary is crossed."""
    monkeypatch.setattr("mergecli.merge.model_stock._PIECE", 7)
    monkeypatch.setattr("mergecli.merge.model_stock._BLOCK", 3)
    base, models = fine_tunes(n, (5, 6))
    base, models = base.to(dtype), models.to(dtype)
    offsets = [m.float() - base.float() for m in models]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = sum(cosine(offsets[i], offsets[j]) for i, j in pairs) / len(pairs)
    t = n * cos / (1 + (n - 1) * cos)
    expected = t * models.float().mean(dim=0) + (1 - t) * base.float()
    out = torch.empty(5, 6, dtype=dtype)
    got = model_stock_streamed(list(models), torch.ones(n), base, out, torch.float32)
    assert got is out
    # The output is rounded once to its dtype, as the whole-tensor form's result would be.
    torch.testing.assert_close(got, expected.to(dtype), **TOL)
    whole = model_stock(models.float(), torch.ones(n), base.float()).to(dtype)
    torch.testing.assert_close(got.float(), whole.float(), **TOL)
    # Identical fine-tunes give the fine-tune; opposite offsets keep the base.
    a = models[0]
    same = model_stock_streamed([a, a], torch.ones(2), base, torch.empty_like(out), torch.float32)
    torch.testing.assert_close(same, a, **TOL)
    zero, offset = torch.zeros(5, 6, dtype=dtype), torch.zeros(5, 6, dtype=dtype)
    offset[0, 0] = 1.0
    kept = model_stock_streamed([offset, -offset], torch.ones(2), zero, out, torch.float32)
    assert torch.equal(kept, zero)
    # filter_wise has no streamed form: the engine runs the stack form.
    assert model_stock_streamed(list(models), torch.ones(n), base, out, torch.float32, True) is None


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_model_stock_streamed_gives_the_same_bits_on_any_number_of_threads(
    workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Determinism on one machine is the behaviour here: pieces taken by several threads in
    whatever order give exactly what one thread gives (the cosines' sums in piece order)."""
    monkeypatch.setattr("mergecli.merge.model_stock._PIECE", 7)
    monkeypatch.setattr("mergecli.merge.model_stock._BLOCK", 3)
    base, models = fine_tunes(3, (37, 11))
    base, models = base.bfloat16(), models.bfloat16()
    one = model_stock_streamed(
        list(models), torch.ones(3), base, torch.empty_like(base), torch.float32
    )
    many = model_stock_streamed(
        list(models), torch.ones(3), base, torch.empty_like(base), torch.float32, workers=workers
    )
    assert torch.equal(one, many)


def test_model_stock_needs_two_fine_tunes() -> None:
    base, models = fine_tunes(1, (3,))
    with pytest.raises(MergeCliError, match="at least two fine-tuned checkpoints, got 1"):
        model_stock(models, torch.ones(1), base)


# Model Breadcrumbs


def breadcrumbs_mask_by_hand(delta: Tensor, density: float, gamma: float) -> Tensor:
    """The paper's mask: rank the magnitudes, drop the top gamma fraction, keep the next
    int(density n) (fewer outliers go where density + gamma > 1)."""
    values = delta.abs().flatten().tolist()
    n = len(values)
    k, top = int(density * n), int(gamma * n)
    top = min(top, n - k)
    ranked = sorted(range(n), key=lambda i: -values[i])  # largest first
    kept = set(ranked[top : top + k])
    return torch.tensor([i in kept for i in range(n)]).reshape(delta.shape)


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.1), (0.3, 0.0), (0.9, 0.2), (0.02, 0.5)])
def test_breadcrumbs_mask(density: float, gamma: float) -> None:
    delta = torch.randn(10, 10, generator=torch.Generator().manual_seed(1))
    expected = delta * breadcrumbs_mask_by_hand(delta, density, gamma)
    got = keep_between_outliers(delta.clone(), density, gamma, rescale=False)
    torch.testing.assert_close(got, expected)
    assert int(torch.count_nonzero(got)) == int(density * 100)
    # rescale restores the L1 norm.
    rescaled = keep_between_outliers(delta.clone(), density, gamma, rescale=True)
    torch.testing.assert_close(rescaled.abs().sum(), delta.abs().sum())
    torch.testing.assert_close(rescaled, expected * (delta.abs().sum() / expected.abs().sum()))


@pytest.mark.parametrize("shape", [(12, 10), (70_000,)])
def test_breadcrumbs_ties_at_the_cuts_go_in_memory_order(shape: tuple[int, ...]) -> None:
    # Few distinct magnitudes, so both cuts fall inside runs of equal ones; the kept entries
    # are ranks n_bot .. n_bot + k of a stable ascending sort (Python's sort is stable). The
    # long vector takes the selection's sampled path.
    delta = torch.randint(-4, 5, shape, generator=torch.Generator().manual_seed(2)).float()
    values = delta.abs().flatten().tolist()
    n = len(values)
    k = int(0.45 * n)
    n_bot = max(0, n - k - int(0.1 * n))
    ascending = sorted(range(n), key=lambda i: values[i])
    mask = torch.zeros(n, dtype=torch.bool)
    mask[ascending[n_bot : n_bot + k]] = True
    got = keep_between_outliers(delta.clone(), 0.45, 0.1, rescale=False)
    assert torch.equal(got, delta * mask.reshape(shape))


def test_breadcrumbs_is_task_arithmetic_over_the_masked_task_vectors() -> None:
    base, models = fine_tunes(2, (8, 8))
    weights = torch.tensor([0.6, 0.4])
    masks = [breadcrumbs_mask_by_hand(m - base, 0.4, 0.1) for m in models]
    expected = base + 0.7 * sum(
        w * mask * (m - base) for w, mask, m in zip(weights, masks, models, strict=True)
    )
    got = breadcrumbs(models.clone(), weights, base, density=0.4, gamma=0.1, lam=0.7)
    torch.testing.assert_close(got, expected, **TOL)
    # Each model may have its own density and gamma.
    masks = [breadcrumbs_mask_by_hand(models[0] - base, 0.4, 0.1),
             breadcrumbs_mask_by_hand(models[1] - base, 0.6, 0.0)]  # fmt: skip
    expected = base + sum(
        w * mask * (m - base) for w, mask, m in zip(weights, masks, models, strict=True)
    )
    got = breadcrumbs(models.clone(), weights, base, density=[0.4, 0.6], gamma=[0.1, 0.0])
    torch.testing.assert_close(got, expected, **TOL)


def test_breadcrumbs_endpoints_of_its_parameters() -> None:
    base, models = fine_tunes(3, (6, 5))
    weights = torch.tensor([1.0, 0.5, 2.0])
    # density 1 keeps everything (gamma is then ignored, as in mergekit): task arithmetic.
    torch.testing.assert_close(
        breadcrumbs(models.clone(), weights, base, gamma=0.3),
        task_arithmetic(models.clone(), weights, base),
        **TOL,
    )
    # No outliers dropped: TIES's trim; with TIES's normalisation, TIES itself.
    torch.testing.assert_close(
        breadcrumbs_ties(models.clone(), weights, base, density=0.3, gamma=0.0, normalize=True),
        ties(models.clone(), weights, base, density=0.3),
        **TOL,
    )


# DELLA


def della_probabilities_by_hand(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """Each entry's keep probability: density - epsilon + 2 epsilon (r - 1) / (m - 1), with r
    the rank (1 = smallest) of its magnitude in its row."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    out = torch.empty_like(rows)
    for i, row in enumerate(rows.tolist()):
        order = sorted(range(len(row)), key=lambda j: abs(row[j]))
        for rank, j in enumerate(order):
            out[i, j] = density - epsilon + 2 * epsilon * rank / (len(row) - 1)
    return out.reshape(delta.shape)


@pytest.mark.parametrize("shape", [(6, 9), (20,)])
def test_della_with_the_same_draws_is_the_formula(shape: tuple[int, ...]) -> None:
    base, models = fine_tunes(2, shape)
    weights = torch.tensor([0.6, 0.4])
    density, epsilon, lam = 0.5, 0.2, 0.9
    # The same uniform draws the method takes, one tensor's worth per model in model order.
    generator = torch.Generator().manual_seed(7)
    draws = [torch.rand(shape, generator=generator) for _ in range(2)]
    pruned = []
    for delta, u in zip(models - base, draws, strict=True):
        kept = delta * (u < della_probabilities_by_hand(delta, density, epsilon))
        pruned.append(kept * delta.abs().sum() / kept.abs().sum())  # the L1 norm restored
    linear = base + lam * (weights[0] * pruned[0] + weights[1] * pruned[1])
    got = della_linear(
        models.clone(), weights, base, torch.Generator().manual_seed(7),
        density=density, epsilon=epsilon, lam=lam,
    )  # fmt: skip
    torch.testing.assert_close(got, linear, **TOL)
    # With sign election and normalisation: per entry, the agreeing ones' weighted mean.
    weighted = torch.stack([w * p for w, p in zip(weights, pruned, strict=True)])
    sign = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    agree = (weighted.sign() == sign).float()
    divisor = (agree * weights.reshape(-1, *[1] * len(shape))).sum(dim=0)
    elected = (weighted * agree).sum(dim=0) / torch.where(divisor == 0, 1.0, divisor)
    got = della(
        models.clone(), weights, base, torch.Generator().manual_seed(7),
        density=density, epsilon=epsilon, lam=lam,
    )  # fmt: skip
    torch.testing.assert_close(got, base + lam * elected, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [1 << 17, 7])
def test_magprune_is_the_formula_across_blocks_and_ties(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, block: int
) -> None:
    # Rows ranked a few at a time (block 7: rows of 3 entries in blocks of 2 rows, a last
    # block of 1) keep the whole tensor's draws; integer-valued entries tie often, and ties
    # rank in memory order.
    monkeypatch.setattr("mergecli.merge.della._BLOCK", block)
    generator = torch.Generator().manual_seed(4)
    delta = torch.randint(-3, 4, (5, 3), generator=generator).to(dtype)
    u = torch.rand(delta.shape, generator=torch.Generator().manual_seed(9))
    expected = delta * (u < della_probabilities_by_hand(delta, 0.5, 0.3))
    got = magprune(
        delta.clone(), 0.5, 0.3, rescale=False, generator=torch.Generator().manual_seed(9)
    )
    assert torch.equal(got, expected)


def test_magprune_ranks_along_dimension_one_of_a_conv_weight() -> None:
    # (out, in, kh, kw): each entry ranked among the `in` entries at its (out, kh, kw).
    delta = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(1))
    u = torch.rand(delta.shape, generator=torch.Generator().manual_seed(2))
    rows = delta.movedim(1, -1).reshape(-1, 5)
    by_hand = della_probabilities_by_hand(rows, 0.5, 0.2).reshape(2, 3, 3, 5).movedim(-1, 1)
    got = magprune(
        delta.clone(), 0.5, 0.2, rescale=False, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(got, delta * (u < by_hand))


def test_della_at_density_one_is_task_arithmetic_and_ties() -> None:
    base, models = fine_tunes(3, (5, 4))
    weights = torch.tensor([0.5, 0.3, 0.2])
    generator = torch.Generator()
    torch.testing.assert_close(
        della_linear(models.clone(), weights, base, generator, lam=0.8),
        task_arithmetic(models.clone(), weights, base, lam=0.8),
        **TOL,
    )
    torch.testing.assert_close(
        della(models.clone(), weights, base, generator),
        ties(models.clone(), weights, base),
        **TOL,
    )


def test_magprune_keeps_large_entries_more_often() -> None:
    delta = torch.randn(200, 500, generator=torch.Generator().manual_seed(3))
    kept = magprune(delta.clone(), 0.4, 0.3, rescale=False, generator=torch.Generator()) != 0
    # Keep probabilities run from 0.1 (smallest in a row) to 0.7 (largest), 0.4 on average.
    assert abs(kept.float().mean().item() - 0.4) < 0.01
    order = delta.abs().argsort(dim=1)
    smallest, largest = kept.gather(1, order[:, :50]), kept.gather(1, order[:, -50:])
    assert abs(smallest.float().mean().item() - 0.13) < 0.02
    assert abs(largest.float().mean().item() - 0.67) < 0.02


def test_della_epsilon_must_leave_probabilities_inside_zero_one() -> None:
    base, models = fine_tunes(2, (4, 4))
    with pytest.raises(RecipeError, match="got density 0.9 and epsilon 0.15"):
        della(models, torch.ones(2), base, torch.Generator(), density=0.9)


# SCE


def sce_by_hand(models: Tensor, base: Tensor, select_topk: float) -> Tensor:
    """SCE entry by entry (FuseChat, Wan et al. 2024, as mergekit 0.1.5 reads it): keep the
    select_topk fraction of positions of largest variance of the task vectors across models
    (of those with variance != 0), weigh model i by mean(d_i^2) / sum_k mean(d_k^2), and per
    position average, with those weights, the task-vector entries of the sign of their sum."""
    n = len(models)
    deltas = [(m - base).flatten().tolist() for m in models]
    size = len(deltas[0])
    variance = []
    for j in range(size):
        column = [d[j] for d in deltas]
        mean = sum(column) / n
        variance.append(sum((x - mean) ** 2 for x in column) / n)
    if select_topk < 1:
        k = int(select_topk * sum(v != 0 for v in variance))
        top = set(sorted(range(size), key=lambda j: -variance[j])[:k])
        deltas = [[x if j in top else 0.0 for j, x in enumerate(d)] for d in deltas]
    energy = [sum(x * x for x in d) / size for d in deltas]
    c = [e / sum(energy) for e in energy] if sum(energy) >= 1e-6 else [1 / n] * n
    out = []
    for j in range(size):
        column = [d[j] for d in deltas]
        sign = 1.0 if sum(column) >= 0 else -1.0
        agree = [i for i in range(n) if column[i] * sign > 0]
        top = sum(c[i] * column[i] for i in agree)
        out.append(top / max(sum(c[i] for i in agree), 1e-6))
    return base + torch.tensor(out).reshape(base.shape)


@pytest.mark.parametrize(
    ("n", "shape", "select_topk"),
    [(2, (6, 5), 1.0), (3, (6, 5), 0.3), (3, (17,), 0.55), (4, (4, 3), 0.0)],
)
def test_sce_is_the_formula(n: int, shape: tuple[int, ...], select_topk: float) -> None:
    base, models = fine_tunes(n, shape, seed=n)
    # Models of different sizes of change, so that the coefficients differ.
    models = base + (models - base) * torch.linspace(0.5, 2.0, n).reshape(-1, *[1] * len(shape))
    expected = sce_by_hand(models, base, select_topk)
    # The recipe's weights play no part (as in mergekit).
    for weights in (torch.ones(n), torch.rand(n)):
        got = sce(models.clone(), weights, base, select_topk=select_topk)
        torch.testing.assert_close(got, expected, **TOL)


def test_sce_invariants() -> None:
    base, models = fine_tunes(3, (5, 4))
    # Identical fine-tunes: every entry agrees, the coefficients are equal: the fine-tune.
    same = models[:1].expand(3, 5, 4).clone()
    torch.testing.assert_close(sce(same.clone(), torch.ones(3), base), models[0], **TOL)
    # Below select_topk 1 only positions that vary are selected: none here, the base comes back.
    torch.testing.assert_close(sce(same.clone(), torch.ones(3), base, select_topk=0.5), base)
    # Models equal to the base: the base.
    torch.testing.assert_close(sce(base.expand(3, 5, 4).clone(), torch.ones(3), base), base)
    # One model: its task vector agrees with itself everywhere: the model.
    torch.testing.assert_close(sce(models[:1].clone(), torch.ones(1), base), models[0], **TOL)


def test_sce_selection_keeps_exactly_k_in_memory_order_on_ties() -> None:
    # Position variances 0, 1, 1, 1, 4 (two models: d = +-v); k = int(0.5 * 4) = 2: the 4 and
    # the first of the equal ones.
    v = torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0])
    deltas = torch.stack([v, -v])
    kept = keep_top_variance(deltas.clone(), 0.5)
    assert kept[0].tolist() == [0.0, 1.0, 0.0, 0.0, 2.0]
