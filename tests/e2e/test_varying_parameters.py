"""Merge parameters that vary by tensor (a scalar, a gradient over the layers, a list of
`{filter, value}`) in recipes run through the CLI, checked against formulas written here."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from helpers import run_cli

pytestmark = pytest.mark.slow

LAYERS = [f"model.layers.{i}.mlp.weight" for i in range(3)]
HEAD = "lm_head.weight"
NAMES = [*LAYERS, HEAD]


def write_checkpoints(folder: Path) -> dict[str, dict[str, Tensor]]:
    """A base and two fine-tunes of it: three layers and a head, 32 x 32 each."""
    generator = torch.Generator().manual_seed(0)
    base = {name: torch.randn(32, 32, generator=generator) for name in NAMES}
    models = {"base": base}
    for tune in ("a", "b"):
        models[tune] = {k: v + torch.randn(v.shape, generator=generator) for k, v in base.items()}
    for key, tensors in models.items():
        save_file(tensors, folder / f"{key}.safetensors")
    return models


def merge(folder: Path, checkpoints: str, step: str) -> dict[str, Tensor]:
    """Run a recipe of one merge step (``step``: the step's YAML body) and read its output."""
    recipe = folder / "recipe.yaml"
    body = textwrap.indent(textwrap.dedent(step).strip(), " " * 6)
    recipe.write_text(
        f"version: 1\ncheckpoints:\n{textwrap.indent(textwrap.dedent(checkpoints).strip(), '  ')}\n"
        f"steps:\n  - merge:\n{body}\noutput: {{dir: out}}\n"
    )
    run_cli("run", "recipe.yaml", "--overwrite", cwd=folder, check=True)
    return load_file(folder / "out" / "model.safetensors")


BASE_AND_TWO = """
- {path: base.safetensors, role: base}
- {path: a.safetensors, weight: 0.6}
- {path: b.safetensors, weight: 0.4}
"""
BASE_AND_ONE = """
- {path: base.safetensors, role: base}
- {path: a.safetensors}
"""


def ties_by_hand(
    base: Tensor, tuned: list[Tensor], weights: list[float], densities: list[float], lam: float
) -> Tensor:
    """TIES (Yadav et al., 2023): trim each task vector to its top-k magnitudes, elect the sign
    of the weighted sum per entry, average the agreeing entries (weighted)."""
    w = torch.tensor(weights).reshape(-1, 1)
    trimmed = []
    for model, density in zip(tuned, densities, strict=True):
        delta = (model - base).flatten()
        k = max(1, int(density * delta.numel()))
        keep = torch.zeros_like(delta, dtype=torch.bool)
        keep[delta.abs().topk(k).indices] = True
        trimmed.append(delta * keep)
    weighted = torch.stack(trimmed) * w
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (weighted * sign) > 0
    divisor = (w * agree).sum(0)
    mixed = (weighted * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)
    return base + lam * mixed.reshape(base.shape)


def slerp_by_hand(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """Spherical interpolation of the two tensors taken as vectors (Shoemake, 1985)."""
    a, b = v0.double().flatten(), v1.double().flatten()
    omega = math.acos(float(a @ b / (a.norm() * b.norm())))
    out = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    return out.reshape(v0.shape).float()


def assert_dare(out: Tensor, base: Tensor, tuned: Tensor, density: float, lam: float) -> None:
    """DARE of one fine-tune: out - base = lam * c * mask * delta, where the mask keeps about
    a `density` fraction of the entries and c rescales the kept ones to the same L1 norm."""
    delta, change = tuned - base, out - base
    if density == 1:
        torch.testing.assert_close(out, base + lam * delta)
        return
    kept = change != 0
    assert abs(kept.float().mean().item() - density) < 0.07
    ratio = change[kept] / delta[kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()), rtol=1e-4, atol=0)
    torch.testing.assert_close(change.abs().sum(), lam * delta.abs().sum(), rtol=1e-5, atol=0)


def test_task_arithmetic_lambda_by_filter_with_a_gradient_default(tmp_path: Path) -> None:
    m = write_checkpoints(tmp_path)
    out = merge(
        tmp_path,
        BASE_AND_TWO,
        """
        method: task_arithmetic
        lambda: [{filter: layers.0., value: 0}, {filter: lm_head, value: 2}, {value: [0.5, 1]}]
        """,
    )
    # layers.0 by its filter, lm_head by its own, layers.1 and .2 by the default's gradient.
    for name, lam in zip(NAMES, (0.0, 0.75, 1.0, 2.0), strict=True):
        task = 0.6 * (m["a"][name] - m["base"][name]) + 0.4 * (m["b"][name] - m["base"][name])
        torch.testing.assert_close(out[name], m["base"][name] + lam * task)
    # lambda 0 adds exactly 0 to the base: the base tensor bit for bit.
    torch.testing.assert_close(out[LAYERS[0]], m["base"][LAYERS[0]], rtol=0, atol=0)


def test_ties_density_by_filter_and_lambda_by_gradient(tmp_path: Path) -> None:
    m = write_checkpoints(tmp_path)
    out = merge(
        tmp_path,
        BASE_AND_TWO,
        """
        method: ties
        density: [{filter: layers.0., value: 1.0}, {value: 0.3}]
        lambda: [0.5, 1.0]
        """,
    )
    for name, density, lam in zip(NAMES, (1.0, 0.3, 0.3, 0.3), (0.5, 0.75, 1.0, 0.5), strict=True):
        tuned = [m["a"][name], m["b"][name]]
        expected = ties_by_hand(m["base"][name], tuned, [0.6, 0.4], [density] * 2, lam)
        torch.testing.assert_close(out[name], expected)


def test_ties_per_model_density_falls_back_to_the_step_then_the_default(tmp_path: Path) -> None:
    """As in mergekit: a model's own setting where one of its filters matches, else the step's,
    else the method's default (density 1)."""
    m = write_checkpoints(tmp_path)
    checkpoints = """
    - {path: base.safetensors, role: base}
    - path: a.safetensors
      parameters: {density: [{filter: layers.0., value: 0.2}]}
    - {path: b.safetensors}
    """
    out = merge(tmp_path, checkpoints, "method: ties\ndensity: [{filter: layers.1., value: 0.4}]")
    own = {LAYERS[0]: (0.2, 1.0), LAYERS[1]: (0.4, 0.4), LAYERS[2]: (1.0, 1.0), HEAD: (1.0, 1.0)}
    for name, densities in own.items():
        tuned = [m["a"][name], m["b"][name]]
        expected = ties_by_hand(m["base"][name], tuned, [1.0, 1.0], list(densities), 1.0)
        torch.testing.assert_close(out[name], expected)


def test_dare_linear_density_by_filter_with_a_gradient_default(tmp_path: Path) -> None:
    m = write_checkpoints(tmp_path)
    out = merge(
        tmp_path,
        BASE_AND_ONE,
        """
        method: dare_linear
        density: [{filter: layers.0., value: 1.0}, {value: [0.2, 0.6]}]
        lambda: 0.8
        """,
    )
    # lm_head lies outside the layers: the gradient's first value.
    for name, density in zip(NAMES, (1.0, 0.4, 0.6, 0.2), strict=True):
        assert_dare(out[name], m["base"][name], m["a"][name], density, 0.8)


def test_dare_ties_density_by_gradient_and_lambda_by_filter(tmp_path: Path) -> None:
    m = write_checkpoints(tmp_path)
    out = merge(
        tmp_path,
        BASE_AND_ONE,
        """
        method: dare_ties
        density: [1.0, 0.3]
        lambda: {filter: layers.1., value: 2.0}
        """,
    )
    # A lone entry is a list of one (mergekit 0.1.5); where it does not match, lambda's
    # default (1) applies.
    for name, density, lam in zip(NAMES, (1.0, 0.65, 0.3, 1.0), (1.0, 2.0, 1.0, 1.0), strict=True):
        assert_dare(out[name], m["base"][name], m["a"][name], density, lam)


def test_slerp_t_by_filter(tmp_path: Path) -> None:
    m = write_checkpoints(tmp_path)
    pair = "- {path: a.safetensors}\n- {path: b.safetensors}"
    step = """
    method: slerp
    t: [{filter: layers.0., value: 0}, {filter: layers.1., value: 1}, {value: 0.3}]
    """
    out = merge(tmp_path, pair, step)
    torch.testing.assert_close(out[LAYERS[0]], m["a"][LAYERS[0]])
    torch.testing.assert_close(out[LAYERS[1]], m["b"][LAYERS[1]])
    for name in (LAYERS[2], HEAD):
        torch.testing.assert_close(out[name], slerp_by_hand(0.3, m["a"][name], m["b"][name]))


def test_slerp_t_by_gradient(tmp_path: Path) -> None:
    m = write_checkpoints(tmp_path)
    out = merge(
        tmp_path, "- {path: a.safetensors}\n- {path: b.safetensors}", "method: slerp\nt: [0, 1]"
    )
    for name, t in zip(NAMES, (0.0, 0.5, 1.0, 0.0), strict=True):
        torch.testing.assert_close(out[name], slerp_by_hand(t, m["a"][name], m["b"][name]))


USER_METHOD = '''\
import torch

from mergecli.merge.step import merge_method


@merge_method("scaled_first")
def scaled_first(models: torch.Tensor, weights: torch.Tensor, scale: float):
    """The first model times `scale` (which has no default)."""
    return scale * models[0]
'''


def test_a_parameter_without_default_needs_a_catch_all_entry(tmp_path: Path) -> None:
    write_checkpoints(tmp_path)
    (tmp_path / "user_merges.py").write_text(USER_METHOD)
    (tmp_path / "recipe.yaml").write_text(
        "version: 1\ncheckpoints: [{path: a.safetensors}, {path: b.safetensors}]\n"
        "steps:\n  - merge:\n      method: 'user_merges:scaled_first'\n"
        "      scale: [{filter: layers.0., value: 2}]\noutput: {dir: out}\n"
    )
    result = run_cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "steps.0 (merge user_merges:scaled_first): scale: no filter entry matches tensor "
        "'lm_head.weight' and the method has no default; add an entry without `filter` as the "
        "last one"
    )
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_malformed_forms_are_recipe_errors_with_their_line(tmp_path: Path) -> None:
    write_checkpoints(tmp_path)
    (tmp_path / "recipe.yaml").write_text(
        textwrap.dedent(
            """\
            version: 1
            checkpoints:
              - {path: base.safetensors, role: base}
              - path: a.safetensors
                parameters:
                  density: [{filter: mlp, value: 0.5, weight: 1}]
            steps:
              - merge:
                  method: ties
                  density:
                    - filter: mlp
                      valu: 0.3
                    - value: high
                  lambda: [0.5, {value: 1}]
              - merge: {method: task_arithmetic, lambda: {filter: mlp}}
              - merge: {method: dare_linear, density: [{filter: mlp, value: [0.5, 2]}]}
              - merge: {method: slerp, t: [{filter: 3, value: 0.5}, {value: []}]}
            """
        )
    )
    result = run_cli("validate", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2
    forms = (
        "expected a number, a list of numbers (a gradient over the layers) or a list of "
        "{filter, value}"
    )
    assert result.stderr.splitlines() == [
        "recipe.yaml:12: steps.0.merge.density.0.valu: unknown key 'valu'; did you mean 'value'? "
        "(allowed: filter, value)",
        "recipe.yaml:13: steps.0.merge.density.1.value: input should be a valid number, unable "
        "to parse string as a number (got 'high')",
        f"recipe.yaml:14: steps.0.merge.lambda: {forms}",
        "recipe.yaml:15: steps.1.merge.lambda.value: required key is missing",
        "recipe.yaml:16: steps.2.merge.density.0.value.1: input should be less than or equal to "
        "1 (got 2)",
        "recipe.yaml:17: steps.3.merge.t.0.filter: input should be a valid string (got 3)",
        "recipe.yaml:17: steps.3.merge.t.1.value: list should have at least 1 item after "
        "validation, not 0",
        "recipe.yaml:6: checkpoints.1.parameters.density.0.weight: unknown key 'weight' "
        "(allowed: filter, value)",
    ]


def test_a_checkpoint_weight_by_filter_and_by_gradient(tmp_path: Path) -> None:
    # mergekit's per-tensor `weight`: a's by filter (layers.0 and the head apart), b's by a
    # gradient over the three layers (the head, outside the layers, takes its first value).
    m = write_checkpoints(tmp_path)
    out = merge(
        tmp_path,
        """
        - path: a.safetensors
          weight: [{filter: layers.0., value: 0.0}, {filter: lm_head, value: 3}, {value: 1}]
        - {path: b.safetensors, weight: [1, 2]}
        """,
        "method: average",
    )
    for name, (wa, wb) in zip(NAMES, ((0, 1), (1, 1.5), (1, 2), (3, 1)), strict=True):
        expected = (wa * m["a"][name] + wb * m["b"][name]) / (wa + wb)
        torch.testing.assert_close(out[name], expected)
    # Weight 0 for a: layers.0 is b's tensor exactly.
    torch.testing.assert_close(out[LAYERS[0]], m["b"][LAYERS[0]], rtol=0, atol=0)


def test_a_varying_weight_without_a_catch_all_or_for_a_whole_model_step_is_one_line(
    tmp_path: Path,
) -> None:
    write_checkpoints(tmp_path)
    (tmp_path / "recipe.yaml").write_text(
        "version: 1\ncheckpoints:\n  - {path: a.safetensors, weight: [{filter: mlp, value: 2}]}\n"
        "  - {path: b.safetensors}\nsteps:\n  - merge: average\noutput: {dir: out}\n"
    )
    result = run_cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "checkpoints.0.weight: no filter entry matches tensor 'lm_head.weight'; add an entry "
            "without `filter` as the last one (the weight elsewhere)"
        )
    )
    assert not (tmp_path / "out" / "model.safetensors").exists()
    # A step that weighs whole models refuses it at validate, at the weight's line.
    (tmp_path / "recipe.yaml").write_text(
        "version: 1\nmodel: {arch: mlp, args: {depth: 3, hidden: 32}}\ncheckpoints:\n"
        "  - {path: a.safetensors, weight: [1, 2]}\n  - {path: b.safetensors}\n"
        "data: {fit: {source: mnist, split: '0:100'}}\n"
        "steps:\n  - merge: fisher\noutput: {dir: out}\n"
    )
    result = run_cli("validate", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "recipe.yaml:4: checkpoints.0.weight: varies by tensor, which only the data-free merge "
        "methods take; merge fisher weighs each model with one number: give one"
    ]
    (tmp_path / "recipe.yaml").write_text(
        "version: 1\ncheckpoints:\n  - {path: a.safetensors, weight: [1, {value: 2}]}\n"
        "steps:\n  - merge: average\noutput: {dir: out}\n"
    )
    result = run_cli("validate", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "checkpoints.0.weight: expected a number, a list of numbers" in result.stderr
