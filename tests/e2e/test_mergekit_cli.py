"""mergekit configs through the CLI as a user runs them: `mergecli run config.yml OUT` writes
what the hand-written mergecli recipe writes, `mergecli convert` prints a recipe `validate`
accepts, and what mergecli cannot express is one line, exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, TESTS, error_line, run_cli, run_cli_in_process, write_tiny_llamas

CONFIGS = TESTS / "fixtures" / "mergekit"

# The mergecli recipe written by hand for a test config (README: "A mergekit recipe maps
# over key by key"), without its output section.
BY_HAND = {
    "ties": """
checkpoints:
  - {path: base, role: base}
  - {path: ft-a, weight: 1.0, parameters: {density: [1, 0.6, 0.2]}}
  - {path: ft-b, weight: 0.5, parameters: {density: [{filter: mlp, value: 0.5}, {value: 0.3}]}}
steps: [{merge: {method: ties, normalize: true}}]
""",
    # Random DARE masks: the same seed (the recipe's, 0) and tensor names draw the same ones.
    "dare_ties": """
checkpoints:
  - {path: base, role: base}
  - {path: ft-a, weight: 0.4, parameters: {density: 0.53}}
  - {path: ft-b, weight: 0.3, parameters: {density: 0.53}}
steps: [{merge: {method: dare_ties, compute_dtype: bfloat16}}]
""",
    "slerp": """
checkpoints: [{path: ft-a}, {path: ft-b}]
steps:
  - merge:
      method: slerp
      t: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]},
          {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}, {value: 0.5}]
""",
    "passthrough": """
checkpoints: [{path: ft-a}, {path: ft-b}]
steps:
  - merge: {method: passthrough, slices: [{model: ft-a, layers: [0, 2]},
                                          {model: ft-b, layers: [1, 3]}]}
""",
    "della": """
checkpoints:
  - {path: base, role: base}
  - {path: ft-a, weight: 0.5, parameters: {density: 0.6, epsilon: 0.1}}
  - {path: ft-b, weight: 0.5, parameters: {density: 0.4}}
steps: [{merge: {method: della}}]
""",
    "sce": """
checkpoints: [{path: base, role: base}, {path: ft-a}, {path: ft-b}]
steps: [{merge: {method: sce, select_topk: 0.6}}]
""",
}


@pytest.fixture
def models_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The models the test configs name (base, ft-a, ft-b), in the working directory."""
    write_tiny_llamas(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def by_hand(name: str, folder: Path) -> dict[str, torch.Tensor]:
    recipe = folder / f"{name}-by-hand.yaml"
    recipe.write_text(
        f"version: 1\n{BY_HAND[name]}output: {{dir: by-hand-{name}, dtype: float32}}\n"
    )
    result = run_cli_in_process("run", str(recipe))
    assert result.returncode == 0, result.stderr
    return load_file(folder / f"by-hand-{name}" / "model.safetensors")


def assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype
        assert torch.equal(tensor, theirs[name]), name  # the same computation: bit for bit


@pytest.mark.slow
def test_run_mergekit_config_as_mergekit_yaml_takes_it(models_here: Path) -> None:
    # The real command, the output dir as mergekit-yaml's second argument.
    run_cli("run", str(CONFIGS / "ties.yml"), "merged", cwd=models_here, check=True)
    merged = load_file(models_here / "merged" / "model.safetensors")
    assert_same(merged, by_hand("ties", models_here))
    resolved = (models_here / "merged" / "recipe.resolved.yaml").read_text()
    assert "method: ties" in resolved


@pytest.mark.parametrize("name", ["dare_ties", "slerp", "passthrough", "della", "sce"])
def test_run_mergekit_config_equals_the_recipe_by_hand(name: str, models_here: Path) -> None:
    result = run_cli_in_process("run", str(CONFIGS / f"{name}.yml"), "--out", "merged")
    assert result.returncode == 0, result.stderr
    assert_same(load_file(models_here / "merged" / "model.safetensors"), by_hand(name, models_here))


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yml")))
def test_convert_prints_a_recipe_validate_accepts(name: str, models_here: Path) -> None:
    result = run_cli_in_process("convert", str(CONFIGS / f"{name}.yml"), "--out", "out")
    assert result.returncode == 0, result.stderr
    recipe = models_here / "converted.yaml"
    recipe.write_text(result.stdout)
    checked = run_cli_in_process("validate", str(recipe))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"# {recipe}: valid")


def test_unsupported_key_is_one_line_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "mk.yml"
    config.write_text(
        "models:\n  - model: a\n  - model: b\nmerge_method: linear\nchat_template: chatml\n"
    )
    line = error_line(run_cli("run", str(config), str(tmp_path / "out")), code=2)
    assert line.startswith(f"{config}:5: chat_template: not supported")


def test_output_dir_given_twice_and_convert_of_a_recipe(tmp_path: Path) -> None:
    config = tmp_path / "mk.yml"
    config.write_text("models:\n  - model: a\nmerge_method: passthrough\n")
    twice = run_cli_in_process("run", str(config), "one", "--out", "two")
    assert twice.returncode == 2
    assert twice.stderr.strip() == "give the output dir once: as the second argument or with --out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\ncheckpoints: [{path: a}]\nsteps: [{merge: passthrough}]\n")
    converted = run_cli_in_process("convert", str(recipe))
    assert converted.returncode == 2
    assert converted.stderr.strip() == (
        f"{recipe}: not a mergekit config (it has no top-level merge_method)"
    )


@pytest.mark.slow
def test_every_parity_bench_config_equals_its_recipe(tmp_path: Path) -> None:
    # Each case of bench/mergekit_parity.py (the methods and parameter forms compared with
    # mergekit 0.1.5 itself): the mergekit config run as it is gives mergecli's recipe's output.
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import mergekit_parity as bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    paths = bench.write_models(tmp_path / "models")
    for case in bench.METHODS:
        recipe = tmp_path / f"{case}-recipe.yaml"
        recipe.write_text(json.dumps(bench.mergecli_recipe(paths, case, tmp_path / case)))
        config = tmp_path / f"{case}-mergekit.yaml"
        config.write_text(json.dumps(bench.mergekit_config(paths, case)))
        for args in (["run", str(recipe)], ["run", str(config), str(tmp_path / f"{case}-mk")]):
            result = run_cli_in_process(*args)
            assert result.returncode == 0, (case, result.stderr)
        ours = load_file(tmp_path / case / "model.safetensors")
        assert_same(load_file(tmp_path / f"{case}-mk" / "model.safetensors"), ours)


def test_validate_reads_a_config_and_out_replaces_a_recipes_output_dir(models_here: Path) -> None:
    checked = run_cli_in_process("validate", str(CONFIGS / "model_stock.yml"))
    assert checked.returncode == 0, checked.stderr
    assert "method: model_stock" in checked.stdout
    recipe = models_here / "r.yaml"
    recipe.write_text(
        "version: 1\ncheckpoints: [{path: ft-a}]\nsteps: [{merge: passthrough}]\n"
        "output: {dir: elsewhere}\n"
    )
    result = run_cli_in_process("run", str(recipe), "--out", "here")
    assert result.returncode == 0, result.stderr
    assert (models_here / "here" / "model.safetensors").is_file()
    assert not (models_here / "elsewhere").exists()
