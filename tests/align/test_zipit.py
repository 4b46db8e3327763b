"""ZipIt!'s greedy matching against a plain implementation of the paper's algorithm, and its
merge/unmerge matrices against their definitions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mergecli.align.zipit import correlation_from_covariance, zip_features


def paper_zip(corr: torch.Tensor, models: int, alpha: float, beta: float) -> list[set[int]]:
    """ZipIt! Sec. 4.3 written out with explicit clusters: repeatedly merge the pair of live
    clusters with the highest score; a new cluster scores alpha * min(its parts' scores) with
    every other; each model may merge two of its own clusters floor((merges // models) * beta)
    times, a cluster being its lowest feature's model's. Ties: the first pair (i < j) of
    lowest features in row-major order."""
    total = corr.shape[0]
    width = total // models
    clusters = {i: {i} for i in range(total)}
    corr = (corr + corr.T) / 2
    score = {(i, j): float(corr[i, j]) for i in range(total) for j in range(total) if i != j}
    left = [int((total - width) // models * beta + 1e-4)] * models

    def owner(c: int) -> int:
        return c // width

    def allowed(i: int, j: int) -> bool:
        return owner(i) != owner(j) or left[owner(i)] > 0

    while len(clusters) > width:
        live = sorted(clusters)
        pairs = [(i, j) for i in live for j in live if i != j and allowed(i, j)]
        i, j = max(pairs, key=lambda p: (score[p], -p[0], -p[1]))
        keep, drop = min(i, j), max(i, j)
        if owner(keep) == owner(drop):
            left[owner(keep)] -= 1
        clusters[keep] |= clusters.pop(drop)
        for k in clusters:
            if k != keep:
                new = alpha * min(score[k, keep], score[k, drop])
                score[k, keep] = score[keep, k] = new
    return sorted(clusters.values(), key=min)


def clusters_of(unmerge: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(column).flatten().tolist()) for column in unmerge.T]


def random_correlation(features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, features, generator=g, dtype=torch.float64)
    half = features // 2
    x[:, half : 2 * half] += 0.8 * x[:, :half]  # some structure across models
    return correlation_from_covariance(torch.cov(x.T))


@pytest.mark.parametrize(
    ("models", "width", "alpha", "beta", "seed"),
    [(2, 6, 0.3, 0.125, 0), (2, 8, 0.5, 0.5, 1), (2, 8, 1.0, 1.0, 2), (3, 5, 0.3, 0.5, 3)],
)
def test_greedy_matching_is_the_papers(models, width, alpha, beta, seed) -> None:
    corr = random_correlation(models * width, seed)
    zipped = zip_features(corr, models, alpha, beta)
    assert clusters_of(zipped.unmerge) == paper_zip(corr, models, alpha, beta)


def test_merge_averages_each_cluster_and_unmerge_sends_it_back() -> None:
    corr = random_correlation(16, 4)
    zipped = zip_features(corr, 2, 0.3, 1.0)
    # Every feature is in exactly one merged feature; the merge averages its members.
    assert torch.equal(zipped.unmerge.sum(1), torch.ones(16, dtype=torch.float64))
    sizes = zipped.unmerge.sum(0)
    assert torch.equal(zipped.merge, (zipped.unmerge / sizes).T)
    torch.testing.assert_close(zipped.merge @ zipped.unmerge, torch.eye(8, dtype=torch.float64))
    # Each model's transform: (models * M_m, U_m); their M_m side by side is the merge.
    parts = [zipped.transform(m) for m in range(2)]
    torch.testing.assert_close(torch.cat([p[0] / 2 for p in parts], 1), zipped.merge)
    torch.testing.assert_close(torch.cat([p[1] for p in parts], 0), zipped.unmerge)


def test_beta_zero_never_merges_two_features_of_one_model() -> None:
    zipped = zip_features(random_correlation(20, 5), 2, 0.3, 0.0)
    assert zipped.within_merges == (0, 0)
    for cluster in clusters_of(zipped.unmerge):
        assert {i // 10 for i in cluster} == {0, 1}


def test_features_that_one_model_duplicates_merge_within_it() -> None:
    # Model A's units 0 and 1 are the same feature; B has it once. With a budget, A's two copies
    # merge with each other first (correlation 1), as ZipIt! allows and a permutation cannot.
    g = torch.Generator().manual_seed(6)
    a = torch.randn(300, 4, generator=g, dtype=torch.float64)
    a[:, 1] = a[:, 0]
    b = torch.randn(300, 4, generator=g, dtype=torch.float64)
    b[:, 2] = a[:, 0] + 0.5 * b[:, 2]
    corr = correlation_from_covariance(torch.cov(torch.cat([a, b], 1).T))
    zipped = zip_features(corr, 2, 0.3, 1.0)
    assert {0, 1} <= next(c for c in clusters_of(zipped.unmerge) if 0 in c)
    assert zipped.within_merges[0] >= 1


def test_a_permuted_copy_zips_unit_to_unit() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64)
    perm = torch.randperm(6, generator=g)
    corr = correlation_from_covariance(torch.cov(torch.cat([x, x[:, perm]], 1).T))
    zipped = zip_features(corr, 2, 0.3, 0.125)
    expected = [{i, 6 + int(torch.nonzero(perm == i))} for i in range(6)]
    assert clusters_of(zipped.unmerge) == expected


def test_correlation_of_constant_units_is_zero() -> None:
    cov = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    corr = correlation_from_covariance(cov)
    assert corr[1].abs().max() == 0 and math.isclose(float(corr[0, 0]), 1.0)


def test_every_budget_and_alpha_leaves_one_width_of_features() -> None:
    corr = random_correlation(12, 8)
    for alpha, beta in itertools.product((0.1, 0.3, 1.0), (0.0, 0.125, 1.0)):
        zipped = zip_features(corr, 2, alpha, beta)
        assert zipped.merge.shape == (6, 12) and zipped.unmerge.shape == (12, 6)


def test_partial_zip_stops_where_no_zipped_layer_reads_a_later_group() -> None:
    # ResNet-20's residual streams (the groups 'conv', 'layer2.0.conv2', 'layer3.0.conv2') run
    # through whole stages: zipping a stream needs every block of its stage zipped, as the
    # paper's partial zip stops at the end of a stage.
    from mergecli.align.spec import derive_spec
    from mergecli.align.zipit_step import trunk_tensors
    from mergecli.errors import MergeCliError
    from mergecli.models import build_model

    model = build_model("resnet20", {"width": 1, "in_channels": 1})
    spec = derive_spec(model, torch.randn(2, 1, 28, 28))
    names = [g.name for g in spec.groups]
    stops = []
    for i, name in enumerate(names):
        try:
            trunk = trunk_tensors(spec, set(names[: i + 1]))
        except MergeCliError as exc:
            assert "is not zipped; stop the zip" in str(exc)
            continue
        stops.append(name)
        assert "layer1.0.conv1.weight" in trunk and "fc.weight" not in trunk
    assert stops == ["layer1.2.conv1", "layer2.0.conv1", "layer2.2.conv1", "layer3.0.conv1",
                     "layer3.2.conv1"]  # fmt: skip
