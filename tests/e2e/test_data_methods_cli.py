"""`mergecli run` with the data-driven merge methods fisher and regmean, after alignment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import error_line, run_cli, run_cli_in_process


def recipe(
    directory: Path,
    a: Path,
    b: Path,
    merge: str,
    fit: bool = True,
    baselines: str = "[endpoints, average, aligned_average]",
) -> Path:
    path = directory / "recipe.yaml"
    data_fit = '  fit: {source: mnist, split: "0:300"}\n' if fit else ""
    path.write_text(
        f"""\
version: 1
name: data-methods
model:
  arch: mlp
  args: {{depth: 3, hidden: 32}}
checkpoints:
  - path: {a}
  - path: {b}
data:
{data_fit}  eval: {{source: mnist, split: "9000:9500"}}
steps:
  - align: {{method: weight_matching}}
  - merge: {merge}
  - evaluate: {{baselines: {baselines}}}
output:
  dir: {directory / "out"}
"""
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "merge", ["{method: fisher, examples: 100}", "{method: regmean, examples: 100, alpha: 0.9}"]
)
def test_data_method_runs_after_align(tmp_path: Path, trained_pair, merge: str) -> None:
    path = recipe(tmp_path, *trained_pair, merge)
    result = run_cli_in_process("run", str(path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["merge"]["examples"] == 100
    rows = {r["kind"]: r for r in report["evaluate"]["results"]}
    # Both methods fit the aligned models' own behaviour: no worse than the naive average.
    assert rows["merged"]["accuracy"] >= rows["average"]["accuracy"]
    assert rows["merged"]["name"].startswith("merged (weight_matching + ")
    assert (tmp_path / "out/model.safetensors").exists()


def test_without_data_fit_is_a_recipe_error(tmp_path: Path, trained_pair) -> None:
    path = recipe(tmp_path, *trained_pair, "{method: fisher}", fit=False)
    line = error_line(run_cli("validate", str(path)), 2)
    assert "steps.1.merge: fisher needs data.fit" in line
    path = recipe(tmp_path, *trained_pair, "{method: regmean}", fit=False)
    result = run_cli_in_process("validate", str(path))
    assert result.returncode == 2 and "steps.1.merge: regmean needs data.fit" in result.stderr


def test_bad_alpha_is_a_recipe_error(tmp_path: Path, trained_pair) -> None:
    path = recipe(tmp_path, *trained_pair, "{method: regmean, alpha: 1.5}")
    result = run_cli_in_process("validate", str(path))
    assert result.returncode == 2 and "alpha" in result.stderr


@pytest.mark.slow
def test_aligned_regmean_baseline_is_the_regmean_merge(tmp_path: Path, trained_pair) -> None:
    # A baseline named `aligned_METHOD` is what a merge step with METHOD makes after `align`.
    merge = "{method: regmean, examples: 100}"
    baselines = "[endpoints, {aligned_regmean: {examples: 100}}, {regmean: {examples: 100}}]"
    path = recipe(tmp_path, *trained_pair, merge, baselines=baselines)
    result = run_cli_in_process("run", str(path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out/report.json").read_text())
    rows = {r["kind"]: r for r in report["evaluate"]["results"]}
    assert rows["aligned_regmean"]["name"] == "aligned_regmean (examples=100)"
    assert rows["aligned_regmean"]["loss"] == pytest.approx(rows["merged"]["loss"], abs=1e-9)
    assert rows["regmean"]["loss"] != pytest.approx(rows["merged"]["loss"], abs=1e-6)
    assert report["merge"]["method"] == "regmean"  # the run's own merge, not a baseline's


@pytest.mark.parametrize(
    ("baselines", "message"),
    [
        ("[aligned_fisher]", "baselines.0: fisher needs data.fit"),
        ("[endpoints, fishr]", "baselines.1: unknown baseline 'fishr'"),
        ("[{regmean: {alpha: 2}}]", "baselines.0: regmean: alpha:"),
        ("[{ensemble: {x: 1}}]", "baselines.0: ensemble takes no parameters"),
    ],
)
def test_bad_merge_baselines_are_recipe_errors(
    tmp_path: Path, trained_pair, baselines: str, message: str
) -> None:
    path = recipe(tmp_path, *trained_pair, "{method: average}", fit=False, baselines=baselines)
    result = run_cli_in_process("validate", str(path))
    assert result.returncode == 2 and message in result.stderr, result.stderr
