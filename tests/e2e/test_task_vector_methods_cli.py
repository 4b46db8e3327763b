"""Model Stock, DELLA and SCE through `mergecli run`, as a user runs them, on tiny checkpoints: the
output against the paper's formula written here, seeded masks, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import error_line, run_cli

pytestmark = pytest.mark.slow

NAMES = ["model.layers.0.mlp.weight", "model.layers.1.mlp.weight", "model.norm.weight"]


def write_checkpoints(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    base = {n: torch.randn(12, 8 if "mlp" in n else 1, generator=generator).squeeze(-1)
            for n in NAMES}  # fmt: skip
    models = {"base": base}
    for tune in ("a", "b", "c"):
        models[tune] = {k: v + 0.1 * torch.randn(v.shape, generator=generator)
                        for k, v in base.items()}  # fmt: skip
    for key, tensors in models.items():
        save_file(tensors, folder / f"{key}.safetensors")
    return models


def run(folder: Path, tunes: str, step: str, seed: int = 0) -> tuple[object, Path]:
    checkpoints = "\n".join(f"  - {{path: {t}.safetensors}}" for t in tunes)
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"version: 1\nseed: {seed}\ncheckpoints:\n  - {{path: base.safetensors, role: base}}\n"
        f"{checkpoints}\nsteps:\n  - merge: {step}\noutput: {{dir: out}}\n"
    )
    return run_cli("run", "recipe.yaml", "--overwrite", cwd=folder), folder / "out"


def test_model_stock_run_is_the_papers_formula(tmp_path: Path) -> None:
    models = write_checkpoints(tmp_path)
    result, out = run(tmp_path, "abc", "{method: model_stock}")
    assert result.returncode == 0, result.stderr
    merged = load_file(out / "model.safetensors")
    for name in NAMES:
        base = models["base"][name].flatten()
        tuned = [models[t][name].flatten() for t in "abc"]
        offsets = [w - base for w in tuned]
        cosines = [
            torch.dot(offsets[i], offsets[j]) / (offsets[i].norm() * offsets[j].norm())
            for i, j in ((0, 1), (0, 2), (1, 2))
        ]
        cos = sum(cosines) / 3
        t = 3 * cos / (1 + 2 * cos)
        expected = t * sum(tuned) / 3 + (1 - t) * base
        torch.testing.assert_close(merged[name].flatten(), expected, rtol=1e-5, atol=1e-6)


def test_sce_run_is_the_formula(tmp_path: Path) -> None:
    models = write_checkpoints(tmp_path)
    result, out = run(tmp_path, "abc", "{method: sce, select_topk: 0.5}")
    assert result.returncode == 0, result.stderr
    merged = load_file(out / "model.safetensors")
    for name in NAMES:
        base = models["base"][name]
        deltas = torch.stack([models[t][name] - base for t in "abc"])
        # Select: the half of the positions (of those that vary) of largest variance.
        variance = ((deltas - deltas.mean(dim=0)) ** 2).mean(dim=0)
        k = int(0.5 * int((variance != 0).sum()))
        threshold = variance.flatten().sort(descending=True).values[k - 1]
        deltas = deltas * (variance >= threshold)
        # Calculate: each model's share of the mean squared task-vector entries.
        energy = torch.stack([(d**2).mean() for d in deltas])
        c = (energy / energy.sum()).reshape(3, *[1] * base.dim())
        # Erase: entries against the sign of the sum; the agreeing ones' c-weighted mean (an
        # unselected position has none: its divisor, floored at 1e-6, leaves the base's).
        agree = (deltas.sign() == torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)).float()
        divisor = (c * agree).sum(dim=0).clamp_min(1e-6)
        expected = base + (c * agree * deltas).sum(dim=0) / divisor
        assert torch.equal(merged[name] == base, variance < threshold)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_della_masks_follow_the_recipe_seed(tmp_path: Path) -> None:
    write_checkpoints(tmp_path)
    step = "{method: della, density: 0.5, epsilon: 0.2}"
    outputs = []
    for seed in (0, 0, 1):
        result, out = run(tmp_path, "ab", step, seed=seed)
        assert result.returncode == 0, result.stderr
        outputs.append(load_file(out / "model.safetensors"))
    name = NAMES[0]
    assert torch.equal(outputs[0][name], outputs[1][name])
    assert not torch.equal(outputs[0][name], outputs[2][name])


def test_model_stock_della_and_sce_errors(tmp_path: Path) -> None:
    write_checkpoints(tmp_path)
    result, _ = run(tmp_path, "a", "{method: model_stock}")
    line = error_line(result, 2)
    assert "model_stock: needs a base and at least two fine-tuned checkpoints, got 1" in line
    result, _ = run(tmp_path, "ab", "{method: della, density: 0.9}")
    line = error_line(result, 2)
    assert "density ± epsilon" in line and "got density 0.9 and epsilon 0.15" in line
    # SCE's select_topk is a fraction of the positions.
    result, out = run(tmp_path, "ab", "{method: sce, select_topk: 1.5}")
    assert "steps.0.merge.select_topk" in error_line(result, 2)
    assert not out.exists()
