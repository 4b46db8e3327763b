"""Methods that merge a set number of checkpoints (slerp, nuslerp, nearswap, model_stock; every
method at least one besides the base): a recipe with another number is a one-line recipe error
naming the step and the count, from `validate` and from `run` before anything is written (exit
2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import error_line, run_cli_in_process

BASE = "  - {path: base.safetensors, role: base}\n"


def checkpoints(tunes: str, base: bool) -> str:
    return (BASE if base else "") + "".join(f"  - {{path: {t}.safetensors}}\n" for t in tunes)


# (method step, checkpoints, what the one line says after `steps.0.merge: `)
CASES = {
    "slerp_three": ("{method: slerp}", checkpoints("abc", False),
                    "merge slerp: interpolates exactly two models (a base and one model, or two "
                    "models), got 3"),
    "slerp_base_and_two": ("{method: slerp}", checkpoints("ab", True),
                           "merge slerp: interpolates exactly two models (a base and one model, "
                           "or two models), got 3"),
    "nuslerp_one": ("{method: nuslerp}", checkpoints("a", True),
                    "merge nuslerp: interpolates exactly two models (besides an optional base), "
                    "got 1"),
    "nuslerp_three": ("{method: nuslerp}", checkpoints("abc", False),
                      "merge nuslerp: interpolates exactly two models (besides an optional "
                      "base), got 3"),
    "nearswap_two": ("{method: nearswap, t: 0.1}", checkpoints("ab", True),
                     "merge nearswap: needs exactly one model besides the base, got 2"),
    # Every method merges at least one checkpoint besides the base.
    "ties_base_alone": ("{method: ties}", checkpoints("", True),
                        "merge ties: there is no checkpoint to merge besides the base"),
    "model_stock_one": ("{method: model_stock}", checkpoints("a", True),
                        "merge model_stock: needs a base and at least two fine-tuned "
                        "checkpoints, got 1 besides the base"),
}  # fmt: skip


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    for name in ("base", "a", "b", "c"):
        save_file({"w": torch.randn(3, 2, generator=generator)}, tmp_path / f"{name}.safetensors")
    return tmp_path


def write_recipe(folder: Path, step: str, models: str) -> Path:
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"version: 1\ncheckpoints:\n{models.replace('path: ', f'path: {folder}/')}"
        f"steps:\n  - merge: {step}\noutput: {{dir: {folder / 'out'}}}\n"
    )
    return recipe


@pytest.mark.parametrize("case", sorted(CASES))
def test_wrong_model_count_is_a_recipe_error(case: str, folder: Path) -> None:
    step, models, message = CASES[case]
    recipe = write_recipe(folder, step, models)
    for command in ("validate", "run"):
        line = error_line(run_cli_in_process(command, str(recipe)), code=2)
        # At the step's line: the n checkpoints take lines 3 to n + 2, `steps:` follows.
        at = 4 + models.count("path:")
        assert line.startswith(f"{recipe}:{at}: steps.0.merge: {message}"), line
    assert not (folder / "out").exists()


@pytest.mark.parametrize(
    ("step", "models"),
    [
        ("{method: slerp}", checkpoints("ab", False)),
        ("{method: slerp}", checkpoints("a", True)),
        ("{method: nuslerp}", checkpoints("ab", True)),
        ("{method: nuslerp}", checkpoints("ab", False)),
        ("{method: nearswap, t: 0.1}", checkpoints("a", True)),
        ("{method: model_stock}", checkpoints("ab", True)),
    ],
)
def test_the_counts_each_method_takes_validate(step: str, models: str, folder: Path) -> None:
    result = run_cli_in_process("validate", str(write_recipe(folder, step, models)))
    assert result.returncode == 0, result.stderr


def test_a_missing_base_is_said_once(folder: Path) -> None:
    # nearswap and model_stock need a base: that is the one problem, not also the count.
    recipe = write_recipe(folder, "{method: model_stock}", checkpoints("a", False))
    line = error_line(run_cli_in_process("validate", str(recipe)), code=2)
    assert "model_stock needs a base model" in line


def test_a_mergekit_config_with_the_wrong_count(folder: Path) -> None:
    config = folder / "mk.yml"
    config.write_text(
        f"models:\n  - model: {folder}/a.safetensors\n  - model: {folder}/b.safetensors\n"
        f"merge_method: nearswap\nbase_model: {folder}/base.safetensors\nparameters: {{t: 0.1}}\n"
    )
    line = error_line(run_cli_in_process("run", str(config), str(folder / "out")), code=2)
    assert line.startswith(f"{config}:")
    assert "merge nearswap: needs exactly one model besides the base, got 2" in line
    assert not (folder / "out").exists()
