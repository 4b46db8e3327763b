"""The interpolation methods of mergekit (nuslerp, multislerp, karcher, nearswap) run through
`mergecli run` on tiny checkpoints, checked against formulas written here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from helpers import error_line, run_cli, run_cli_in_process

pytestmark = pytest.mark.slow

NAMES = ["model.layers.0.mlp.weight", "model.layers.1.mlp.weight", "lm_head.weight"]


def write_checkpoints(folder: Path) -> dict[str, dict[str, Tensor]]:
    """A base and two fine-tunes of it (three 6 x 5 tensors each), and an integer counter."""
    generator = torch.Generator().manual_seed(0)
    base = {name: torch.randn(6, 5, generator=generator) for name in NAMES}
    models = {"base": base}
    for tune in ("a", "b"):
        models[tune] = {k: v + torch.randn(v.shape, generator=generator) for k, v in base.items()}
    for key, tensors in models.items():
        save_file({**tensors, "steps": torch.tensor(7)}, folder / f"{key}.safetensors")
    return models


def slerp_by_hand(t: float, a: Tensor, b: Tensor) -> Tensor:
    """Shoemake's slerp, each tensor taken as one vector."""
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    w = math.acos(cos)
    return math.sin((1 - t) * w) / math.sin(w) * a + math.sin(t * w) / math.sin(w) * b


def write_recipe(folder: Path, checkpoints: str, step: str) -> Path:
    """A recipe of one merge step; checkpoint paths are relative to ``folder``."""
    recipe = folder / "recipe.yaml"
    checkpoints = checkpoints.replace("path: ", f"path: {folder}/")
    recipe.write_text(
        f"version: 1\ncheckpoints:\n{checkpoints}steps:\n  - merge: {step}\n"
        f"output: {{dir: {folder / 'out'}}}\n"
    )
    return recipe


BASE_AND_TWO = (
    "  - {path: base.safetensors, role: base}\n"
    "  - {path: a.safetensors, weight: 0.6}\n"
    "  - {path: b.safetensors, weight: 0.4}\n"
)


def test_nuslerp_of_task_vectors_through_the_cli(tmp_path: Path) -> None:
    models = write_checkpoints(tmp_path)
    recipe = write_recipe(tmp_path, BASE_AND_TWO, "{method: nuslerp}")
    run_cli("run", str(recipe), cwd=tmp_path, check=True)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    base, a, b = models["base"], models["a"], models["b"]
    for name in NAMES:
        # t = w_b / (w_a + w_b) = 0.4, over the task vectors, added back to the base.
        expected = base[name] + slerp_by_hand(0.4, a[name] - base[name], b[name] - base[name])
        torch.testing.assert_close(merged[name], expected, atol=1e-5, rtol=1e-5)
    assert merged["steps"].item() == 7


def test_nearswap_and_karcher_in_process(tmp_path: Path) -> None:
    models = write_checkpoints(tmp_path)
    base_and_a = "  - {path: base.safetensors, role: base}\n  - {path: a.safetensors}\n"
    recipe = write_recipe(tmp_path, base_and_a, "{method: nearswap, t: 0.5}")
    result = run_cli_in_process("run", str(recipe), "--overwrite")
    assert result.returncode == 0, result.stderr
    merged = load_file(tmp_path / "out" / "model.safetensors")
    base, a = models["base"]["lm_head.weight"], models["a"]["lm_head.weight"]
    weight = (0.5 / (a - base).abs()).clamp(max=1)
    torch.testing.assert_close(merged["lm_head.weight"], weight * a + (1 - weight) * base)
    # Identical inputs: the Karcher mean is the model itself.
    same = "  - {path: a.safetensors}\n  - {path: a.safetensors}\n"
    recipe = write_recipe(tmp_path, same, "{method: karcher}")
    result = run_cli_in_process("run", str(recipe), "--overwrite")
    assert result.returncode == 0, result.stderr
    merged = load_file(tmp_path / "out" / "model.safetensors")
    torch.testing.assert_close(merged["lm_head.weight"], models["a"]["lm_head.weight"])


def test_interpolation_recipe_errors(tmp_path: Path) -> None:
    write_checkpoints(tmp_path)
    recipe = write_recipe(tmp_path, BASE_AND_TWO, "{method: nearswap}")
    result = run_cli_in_process("validate", str(recipe))
    assert result.returncode == 2
    assert "steps.0.merge.t" in error_line(result)
    recipe = write_recipe(tmp_path, BASE_AND_TWO, "{method: nearswap, t: 0.1}")
    # The count is the recipe's: refused before anything runs (exit 2).
    result = run_cli_in_process("run", str(recipe))
    assert "nearswap: needs exactly one model besides the base, got 2" in error_line(result, 2)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    no_base = "  - {path: a.safetensors}\n  - {path: b.safetensors}\n"
    recipe = write_recipe(tmp_path, no_base, "{method: nearswap, t: 0.1}")
    result = run_cli_in_process("validate", str(recipe))
    assert result.returncode == 2
    assert "nearswap needs a base model" in error_line(result)
