"""Methods a user writes: `method: "package.module:function"` runs a function registered with the
same decorators as the built-in ones, its parameters validated from its signature or model."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_cli

pytestmark = pytest.mark.slow

USER_MODULE = '''\
import torch

from mergecli.merge.step import merge_method
from mergecli.registry import StepParams, step_method


@merge_method("larger_magnitude")
def larger_magnitude(models: torch.Tensor, weights: torch.Tensor, scale: float = 1.0):
    """Each entry from the model where it is largest in magnitude, times `scale`."""
    winner = models.abs().argmax(dim=0, keepdim=True)
    return scale * models.gather(0, winner).squeeze(0)


class ScaleParams(StepParams):
    factor: float = 1.0


@step_method("repair", "scale_all", ScaleParams)
def scale_all(state, params: ScaleParams) -> None:
    """Multiply every merged tensor by `factor`."""
    state.merged = {name: params.factor * t for name, t in dict(state.merged).items()}


def not_registered(models, weights):
    return models.mean(0)
'''


def setup(folder: Path, steps: str) -> Path:
    """Two checkpoints, the user's module and a recipe with ``steps``, all in ``folder``."""
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        tensors = {f"w{i}": torch.randn(8, 8, generator=generator) for i in range(3)}
        save_file(tensors, folder / f"m{seed}.safetensors")
    (folder / "my_methods.py").write_text(USER_MODULE)
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        "version: 1\nname: user\n"
        "checkpoints: [{path: m0.safetensors}, {path: m1.safetensors}]\n"
        f"steps:\n{textwrap.indent(steps, '  ')}\noutput: {{dir: out}}\n"
    )
    return recipe


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line[:4].isdigit()]


def test_a_user_merge_method_runs_with_its_parameters(tmp_path: Path) -> None:
    setup(tmp_path, '- merge: {method: "my_methods:larger_magnitude", scale: 0.5}')
    validated = run_cli("validate", "recipe.yaml", cwd=tmp_path, check=True)
    assert "method: my_methods:larger_magnitude" in validated.stdout
    assert "scale: 0.5" in validated.stdout
    run_cli("run", "recipe.yaml", cwd=tmp_path, check=True)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    a, b = (load_file(tmp_path / f"m{seed}.safetensors") for seed in (0, 1))
    for name in a:
        expected = 0.5 * torch.where(a[name].abs() >= b[name].abs(), a[name], b[name])
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-7)


def test_a_user_step_of_another_kind_runs_after_a_builtin_one(tmp_path: Path) -> None:
    setup(
        tmp_path,
        '- merge: average\n- repair: {method: "my_methods:scale_all", factor: 2.0}',
    )
    run_cli("run", "recipe.yaml", cwd=tmp_path, check=True)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    a, b = (load_file(tmp_path / f"m{seed}.safetensors") for seed in (0, 1))
    for name in a:
        torch.testing.assert_close(merged[name], a[name] + b[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ('- merge: {method: "my_methods:larger_magnitude", scale: big}', "scale"),
        ('- merge: {method: "my_methods:larger_magnitude", sclae: 1}', "sclae"),
        ('- merge: {method: "my_methods:not_registered"}', "not a registered method"),
        ('- merge: {method: "my_methods:scale_all"}', "a repair method, not a merge method"),
        ('- merge: {method: "my_methods:missing"}', "has no 'missing'"),
        ('- merge: {method: "no_such_module:f"}', "cannot import module 'no_such_module'"),
    ],
)
def test_user_method_mistakes_are_one_recipe_line(
    tmp_path: Path, steps: str, expected: str
) -> None:
    setup(tmp_path, steps)
    result = run_cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith("recipe.yaml:5: steps.0.merge") and expected in line, line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
