"""Data-free merge methods against independent formulas, and as recipe steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_cli
from mergecli.merge.slerp import slerp
from mergecli.merge.sparsify import drop_and_rescale, keep_top_magnitude, kth_largest
from mergecli.merge.task_arithmetic import dare_linear, dare_ties, task_arithmetic, ties


def stack(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.stack(tensors)


def test_task_arithmetic_is_the_formula() -> None:
    base, a, b = torch.randn(3, 4, 5).unbind()
    w = torch.tensor([0.6, 0.4])
    got = task_arithmetic(stack(a, b), w, base, lam=0.5)
    torch.testing.assert_close(got, base + 0.5 * (0.6 * (a - base) + 0.4 * (b - base)))
    normalized = task_arithmetic(stack(a, b), torch.tensor([3.0, 1.0]), base, normalize=True)
    torch.testing.assert_close(normalized, base + 0.75 * (a - base) + 0.25 * (b - base))


def _ties_by_hand(models, weights, base, density, lam):
    """TIES written entry by entry, as the paper describes it."""
    deltas = []
    for m in models:
        d = (m - base).flatten()
        k = max(1, int(density * d.numel()))
        threshold = d.abs().sort(descending=True).values[k - 1]
        deltas.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    out = base.flatten().clone()
    for j in range(out.numel()):
        contributions = [w * d[j] for w, d in zip(weights.tolist(), deltas, strict=True)]
        sign = 1.0 if sum(contributions) >= 0 else -1.0
        agreeing = [
            (c, w) for c, w in zip(contributions, weights.tolist(), strict=True) if c * sign > 0
        ]
        if agreeing:
            total = sum(c for c, _ in agreeing) / sum(w for _, w in agreeing)
            out[j] += lam * total
    return out.reshape(base.shape)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
def test_ties_matches_the_paper_entry_by_entry(density: float) -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 7, generator=generator)
    models = base + torch.randn(3, 6, 7, generator=generator)
    weights = torch.tensor([1.0, 0.5, 2.0])
    got = ties(models.clone(), weights, base, density=density, lam=0.8)
    torch.testing.assert_close(got, _ties_by_hand(models, weights, base, density, 0.8))


def test_ties_of_agreeing_dense_vectors_is_the_weighted_average() -> None:
    base = torch.zeros(10)
    a, b = torch.rand(10) + 0.1, torch.rand(10) + 0.1
    got = ties(stack(a, b), torch.tensor([1.0, 3.0]), base)
    torch.testing.assert_close(got, 0.25 * a + 0.75 * b)


def test_sparsifiers() -> None:
    d = torch.tensor([0.1, -5.0, 2.0, -0.3])
    assert torch.equal(keep_top_magnitude(d, 0.5), torch.tensor([0.0, -5.0, 2.0, 0.0]))
    big = torch.randn(10_000)
    kept = drop_and_rescale(big.clone(), 0.3, torch.Generator().manual_seed(0))
    assert abs((kept != 0).float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(kept.abs().sum(), big.abs().sum())
    assert torch.equal(drop_and_rescale(big, 1.0, torch.Generator()), big)


@pytest.mark.parametrize(
    "values",
    [
        torch.randn(300_000),
        torch.randint(-50, 50, (300_000,)).float(),  # many ties at every threshold
        torch.cat([torch.zeros(290_000), torch.randn(10_000)]),  # mostly zeros
        torch.logspace(-30, 30, 200_001),  # sorted, heavy range
    ],
)
def test_kth_largest_equals_a_full_selection(values: torch.Tensor) -> None:
    n = values.numel()
    for k in (1, 2, n // 100, n // 3, n // 2, n - 1, n):
        expected = values.kthvalue(n - k + 1).values
        assert kth_largest(values, k) == expected, k


def test_top_magnitude_keeps_exactly_k_entries_with_ties() -> None:
    delta = torch.randint(-3, 4, (200_000,)).float()
    kept = keep_top_magnitude(delta.clone(), 0.3)
    assert int((kept != 0).sum()) == int(0.3 * delta.numel())
    assert torch.equal(kept[kept != 0], delta[kept != 0])
    assert delta[kept == 0].abs().max() <= kept[kept != 0].abs().min()


def test_dare_at_density_one_is_task_arithmetic_and_ties() -> None:
    base, a, b = torch.randn(3, 8).unbind()
    w = torch.tensor([0.7, 0.3])
    g = torch.Generator()
    torch.testing.assert_close(
        dare_linear(stack(a, b), w, base, g), task_arithmetic(stack(a, b), w, base)
    )
    torch.testing.assert_close(
        dare_ties(stack(a, b), w, base, g, normalize=True), ties(stack(a, b), w, base)
    )


def test_slerp_endpoints_angle_and_colinear_fallback() -> None:
    v0, v1 = torch.randn(2, 4, 6).unbind()
    torch.testing.assert_close(slerp(stack(v0, v1), torch.ones(2), t=0.0), v0)
    torch.testing.assert_close(slerp(stack(v0, v1), torch.ones(2), t=1.0), v1)
    # Orthonormal vectors: the midpoint is (v0 + v1) / sqrt(2), still of unit norm.
    e0, e1 = torch.eye(2)
    mid = slerp(stack(e0[None], e1[None]), torch.ones(2), t=0.5)
    torch.testing.assert_close(mid, ((e0 + e1) / math.sqrt(2))[None])
    # Colinear tensors fall back to linear interpolation.
    row = torch.randn(1, 5)
    torch.testing.assert_close(slerp(stack(row, 3 * row), torch.ones(2), t=0.25), 1.5 * row)
    # A base and one model are the two ends.
    torch.testing.assert_close(slerp(v1[None], torch.ones(1), base=v0, t=0.0), v0)


def _checkpoints(tmp_path: Path) -> tuple[Path, Path, Path]:
    generator = torch.Generator().manual_seed(0)
    base = {"layers.0.weight": torch.randn(8, 4, generator=generator), "step": torch.tensor(3)}
    paths = []
    for name, scale in (("base", 0.0), ("ft-a", 0.1), ("ft-b", 0.2)):
        tensors = {
            k: v + scale * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in base.items()
        }
        paths.append(tmp_path / f"{name}.safetensors")
        save_file(tensors, paths[-1])
    return paths[0], paths[1], paths[2]


@pytest.mark.slow
def test_ties_recipe_with_base(tmp_path: Path) -> None:
    base, a, b = _checkpoints(tmp_path)
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(
        "version: 1\n"
        f"checkpoints:\n  - {{path: {base}, role: base}}\n  - {{path: {a}, weight: 0.6}}\n"
        f"  - {{path: {b}, weight: 0.4}}\n"
        "steps:\n  - merge: {method: ties, density: 0.5, lambda: 1.0}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    run_cli("run", str(recipe), check=True)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    tb, ta, tbb = load_file(base), load_file(a), load_file(b)
    name = "layers.0.weight"
    expected = ties(stack(ta[name], tbb[name]), torch.tensor([0.6, 0.4]), tb[name], density=0.5)
    torch.testing.assert_close(merged[name], expected)
    assert merged["step"].item() == 3


@pytest.mark.slow
def test_datafree_recipe_errors(tmp_path: Path) -> None:
    base, a, b = _checkpoints(tmp_path)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        f"version: 1\ncheckpoints: [{{path: {a}}}, {{path: {b}}}]\n"
        "steps:\n  - merge: {method: ties, density: 1.5}\n"
    )
    result = run_cli("validate", str(recipe))
    assert result.returncode == 2
    assert (
        ":4: steps.0.merge.density: input should be less than or equal to 1 (got 1.5)"
        in result.stderr
    )
    assert (
        ":4: steps.0.merge: ties needs a base model; mark one checkpoint `role: base`"
        not in result.stderr
    )
    recipe.write_text(recipe.read_text().replace("density: 1.5", "density: 0.5"))
    result = run_cli("validate", str(recipe))
    assert (
        ":4: steps.0.merge: ties needs a base model; mark one checkpoint `role: base`"
        in result.stderr
    )
    recipe.write_text(
        recipe.read_text().replace("{method: ties, density: 0.5}", "{method: slerp, t: 2}")
    )
    result = run_cli("validate", str(recipe))
    assert "steps.0.merge.t: input should be less than or equal to 1 (got 2)" in result.stderr


@pytest.mark.slow
def test_gradient_over_layers_in_a_recipe(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(3, 3, generator=generator) for i in range(3)}
    tuned = {k: v + torch.randn(v.shape, generator=generator) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    recipe = tmp_path / "grad.yaml"
    recipe.write_text(
        "version: 1\n"
        f"checkpoints: [{{path: {tmp_path / 'base.safetensors'}, role: base}}, "
        f"{{path: {tmp_path / 'tuned.safetensors'}}}]\n"
        "steps: [{merge: {method: task_arithmetic, lambda: [0.0, 1.0]}}]\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    run_cli("run", str(recipe), check=True)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for i, lam in enumerate((0.0, 0.5, 1.0)):
        name = f"layers.{i}.weight"
        torch.testing.assert_close(merged[name], base[name] + lam * (tuned[name] - base[name]))
