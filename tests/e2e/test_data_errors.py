"""Data-side mistakes, run as a user runs them: labels the model has no output for, inputs of
the wrong shape, NaN or inf inputs. Each is one stderr line and exit 1, never a traceback or
an "internal error" (exit 70), whichever step first meets the data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import SMALL_MLP, run_cli
from mergecli.data import load_data
from mergecli.errors import MergeCliError

ROWS = 64
BAD_ROW = 7

# The steps that run the model on data, each with the data split it reads.
STEPS = {
    "activation_matching": ("fit", "  - align: {method: activation_matching}"),
    "fit": ("fit", "  - fit: {steps: 2}"),
    "evaluate": ("eval", "  - merge: {method: average}\n  - evaluate: {baselines: [endpoints]}"),
    "repair": ("fit", "  - merge: {method: average}\n  - repair: {method: repair}"),
}


def data_file(tmp_path: Path, features: int = 784, label: int = 3, value: float = 0.0) -> Path:
    """A tensors file of MNIST-shaped inputs whose row BAD_ROW has ``label`` and ``value``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, features, generator=generator)
    y = torch.randint(0, 10, (ROWS,), generator=generator)
    x[BAD_ROW, features // 2] = value
    y[BAD_ROW] = label
    path = tmp_path / "data.safetensors"
    save_file({"x": x, "y": y}, str(path))
    return path


def recipe(tmp_path: Path, pair: tuple[Path, Path], step: str, data: Path, extra: str = "") -> Path:
    """A recipe whose ``step`` reads ``data`` (through data.fit or data.eval)."""
    split, steps = STEPS[step]
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"""\
version: 1
name: data-errors
model: {{arch: mlp, args: {{depth: 3, hidden: 32}}}}
checkpoints:
  - path: {pair[0]}
  - path: {pair[1]}
data:
  {split}: {{source: tensors, path: {data}{extra}}}
steps:
{steps}
output: {{dir: {tmp_path / "out"}}}
"""
    )
    return path


def one_error_line(*args: str, code: int = 1) -> str:
    """Run the CLI expecting ``code`` and exactly one line besides the progress lines (exit 2:
    what the checks before any step find, at the recipe's line)."""
    result = run_cli(*args)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line[:4].isdigit()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("step", ["activation_matching", "fit", "evaluate"])
def test_label_beyond_the_models_outputs(tmp_path: Path, trained_pair, step: str) -> None:
    data = data_file(tmp_path, label=11)
    line = one_error_line("run", str(recipe(tmp_path, trained_pair, step, data)))
    split = STEPS[step][0]
    for needle in (f"data.{split}", str(data), f"label 11 in row {BAD_ROW}", "10 outputs"):
        assert needle in line, line
    assert not (tmp_path / "out").exists()


def test_label_row_is_the_files_row_after_a_split(tmp_path: Path, trained_pair) -> None:
    data = data_file(tmp_path, label=10)
    path = recipe(tmp_path, trained_pair, "fit", data, extra=', split: "5:40"')
    assert f"label 10 in row {BAD_ROW} " in one_error_line("run", str(path))


@pytest.mark.parametrize("step", ["activation_matching", "fit", "evaluate", "repair"])
def test_inputs_of_the_wrong_shape(tmp_path: Path, trained_pair, step: str) -> None:
    data = data_file(tmp_path, features=100)
    line = one_error_line("run", str(recipe(tmp_path, trained_pair, step, data)), code=2)
    for needle in (f"data.{STEPS[step][0]}", str(data), "[100]", "mlp", "784 features"):
        assert needle in line, line


def test_wrong_model_input_shape_prints_no_traceback(tmp_path: Path, trained_pair) -> None:
    path = recipe(tmp_path, trained_pair, "activation_matching", data_file(tmp_path))
    path.write_text(path.read_text().replace("hidden: 32}", "hidden: 32}, input_shape: [100]"))
    line = one_error_line("run", str(path), code=2)
    assert line.startswith(f"{path}:3: model.input_shape: inputs of shape [100]"), line
    assert "takes 784 features" in line, line


@pytest.mark.parametrize("step", ["activation_matching", "fit", "evaluate"])
def test_nan_inputs(tmp_path: Path, trained_pair, step: str) -> None:
    data = data_file(tmp_path, value=float("nan"))
    line = one_error_line("run", str(recipe(tmp_path, trained_pair, step, data)))
    assert f"data.{STEPS[step][0]}.x" in line and str(data) in line, line
    assert f"NaN in row {BAD_ROW}" in line and "please report" not in line, line
    assert not (tmp_path / "out").exists()


def test_train_refuses_labels_beyond_the_models_outputs(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    args = ("train", *SMALL_MLP, "--arg", "num_classes=5", "--data", "mnist:0:300")
    line = one_error_line(*args, "--eval-data", "none", "--epochs", "1", "--out", str(out))
    assert "--data" in line and "5 outputs" in line and "label 7 in row 0" in line, line
    assert not out.exists()


def test_inf_inputs_named_with_their_file_row(tmp_path: Path) -> None:
    data = data_file(tmp_path, value=float("inf"))
    spec = {"source": "tensors", "path": str(data), "split": "4:20"}
    with pytest.raises(MergeCliError, match=f"infinite values in row {BAD_ROW} "):
        load_data(spec, where="data.eval")


def test_negative_label_names_its_row(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save_file({"x": torch.zeros(5, 2), "y": torch.tensor([0, 1, 2, -1, 4])}, str(path))
    with pytest.raises(MergeCliError, match="negative label, -1 in row 3"):
        load_data({"source": "tensors", "path": str(path)}, where="data.fit")
