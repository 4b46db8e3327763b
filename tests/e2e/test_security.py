"""Safe by construction: nothing read from a file decides what code runs, or where files go.

Checkpoint metadata names only built-in architectures, report.json names only known analysis
kinds inside its own directory, a recipe's name is one path component, YAML aliases and nesting
are bounded before anything is built, and recipe numbers are finite."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import cli_env, mlp_checkpoint, run_cli
from mergecli.models import build_model
from mergecli.recipe import (
    CheckpointSpec,
    DataSection,
    DataSpec,
    ModelSpec,
    OutputSpec,
    Recipe,
    SlurmSpec,
    load_recipe,
)
from mergecli.registry import all_methods

MLP_ARGS = {"depth": 2, "hidden": 16}
PROGRESS = re.compile(r"^\d{4}-\d\d-\d\dT\S+ ")  # a timestamped log line, not an error


def one_line_error(result: subprocess.CompletedProcess, code: int) -> str:
    """The run failed with ``code``, printing one error line and no traceback (after any
    progress lines); return that line."""
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if not PROGRESS.match(line)]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    return lines[0]


# --- recipes --------------------------------------------------------------------------------

RECIPE = """\
version: 1
name: {name}
model: {{arch: mlp, args: {{depth: 2, hidden: 16}}}}
checkpoints: [{{path: a.safetensors}}, {{path: b.safetensors}}]
steps:
  - merge: average
{output}"""


@pytest.mark.parametrize(
    ("step", "where"),
    [
        ("fit: {lr: .inf}", "fit.lr: input should be a finite number"),
        ("fit: {lr: .nan}", "fit.lr: input should be a finite number"),
        ("merge: {method: slerp, t: [{filter: w, value: .inf}]}",
         "merge.t.0.value: input should be a finite number"),
    ],
)  # fmt: skip
def test_recipe_numbers_are_finite(tmp_path: Path, step: str, where: str) -> None:
    recipe = tmp_path / "recipe.yaml"
    text = RECIPE.format(name="finite", output="").replace("merge: average", step)
    recipe.write_text(text + "data: {fit: {source: mnist}}\n")
    result = run_cli("validate", str(recipe))
    # A value that fails every form of a varying parameter is reported once per form.
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{recipe}:6: steps.0.{where}" in result.stderr


def test_checkpoint_weight_is_finite(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    text = RECIPE.format(name="finite", output="")
    recipe.write_text(text.replace("{path: b.safetensors}", "{path: b.safetensors, weight: -.inf}"))
    line = one_line_error(run_cli("validate", str(recipe)), 2)
    assert line.startswith(f"{recipe}:4: checkpoints.1.weight: input should be a finite number")


def test_every_recipe_model_refuses_inf_and_nan() -> None:
    # By the class, not field by field: every section and every method's parameters.
    models = [Recipe, ModelSpec, CheckpointSpec, DataSection, DataSpec, OutputSpec, SlurmSpec]
    models += [method.params for method in all_methods()]
    assert all(model.model_config.get("allow_inf_nan") is False for model in models)


@pytest.mark.parametrize("steps", ["steps: []\n", ""])
def test_a_recipe_needs_steps(tmp_path: Path, steps: str) -> None:
    recipe = tmp_path / "recipe.yaml"
    text = RECIPE.format(name="nothing", output="").replace("steps:\n  - merge: average\n", steps)
    recipe.write_text(text)
    line = one_line_error(run_cli("run", str(recipe), cwd=tmp_path), 2)
    where = ":5: steps:" if steps else ":1: steps:"
    assert line.startswith(f"{recipe}{where} no steps; add at least one")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../../../tmp/x", "a/b", "'a\\\\b'", "'.'", "'..'", "''"])
def test_recipe_name_is_one_path_component(tmp_path: Path, name: str) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(name=name, output=""))
    line = one_line_error(run_cli("run", str(recipe), cwd=tmp_path), 2)
    assert line.startswith(f"{recipe}:2: name: must be a plain name") and "output.dir" in line
    assert not (tmp_path / "out").exists()
    # An explicit output.dir may be anywhere.
    recipe.write_text(RECIPE.format(name="x", output="output: {dir: ../elsewhere}\n"))
    assert load_recipe(recipe).output_dir == Path("../elsewhere")


BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{name}: &{name} [{','.join([f'*{previous}'] * 9)}]\n"
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True)
)

MEASURE = """\
import sys, time, tracemalloc
from mergecli.errors import RecipeError
from mergecli.recipe import load_recipe
tracemalloc.start()
started = time.perf_counter()
try:
    load_recipe(sys.argv[1])
except RecipeError as exc:
    print(exc)
print(time.perf_counter() - started, tracemalloc.get_traced_memory()[1])
"""


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    assert len(BOMB) < 400  # a billion "lol"s
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BOMB)
    # Measured in a process of its own: the old loader took seconds and gigabytes.
    measured = subprocess.run(
        [sys.executable, "-c", MEASURE, str(recipe)],
        capture_output=True, text=True, env=cli_env(), timeout=120,
    )  # fmt: skip
    message, numbers = measured.stdout.strip().splitlines()
    seconds, peak_bytes = float(numbers.split()[0]), int(numbers.split()[1])
    assert seconds < 1.0 and peak_bytes < 100 * 2**20, (seconds, peak_bytes)
    assert message.startswith(f"{recipe}:") and "aliases expand to more than 100,000" in message
    line = one_line_error(run_cli("validate", str(recipe)), 2)
    assert "aliases expand to more than 100,000 values" in line


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[" * 5000 + "]" * 5000, ":1: nested deeper than 100 levels"),
        ("a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 120)) + "  " * 120 + "v\n",
         ":101: nested deeper than 100 levels"),
        ("a: &a [*a]\n", ":1: an alias refers to a value that contains it"),
    ],
)  # fmt: skip
def test_deep_or_recursive_yaml_is_a_recipe_error(tmp_path: Path, text: str, problem: str) -> None:
    recipe = tmp_path / "deep.yaml"
    recipe.write_text(text)
    line = one_line_error(run_cli("validate", str(recipe)), 2)
    assert line.startswith(str(recipe)) and problem in line


def test_ordinary_aliases_still_work(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        RECIPE.format(name="aliases", output="")
        + "data: {fit: &d {source: mnist, split: '0:100'}, eval: *d}\n"
        + "x: &deep "
        + "[" * 60
        + "]" * 60
        + "\n"
    )
    # An unknown key holding an alias is still reported on its own line.
    line = one_line_error(run_cli("validate", str(recipe)), 2)
    assert line.startswith(f"{recipe}:8: x: unknown key 'x'")
    recipe.write_text(recipe.read_text().rpartition("x: &deep")[0])
    for seed, name in enumerate(("a", "b")):  # validate checks the files the recipe names
        mlp_checkpoint(tmp_path / f"{name}.safetensors", seed, **MLP_ARGS)
    result = run_cli("validate", str(recipe), cwd=tmp_path, check=True)
    assert "split: 0:100" in result.stdout.replace("'", "")


# --- checkpoint metadata ---------------------------------------------------------------------


def mlp_checkpoints(folder: Path, arch: str, args: str) -> tuple[Path, Path]:
    """Two small MLPs whose safetensors metadata says ``mergecli.arch: arch`` and
    ``mergecli.args: args``, as a file written by anyone may say."""
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        tensors = build_model("mlp", MLP_ARGS).state_dict()
        path = folder / f"m{seed}.safetensors"
        save_file(tensors, path, {"format": "pt", "mergecli.arch": arch, "mergecli.args": args})
        paths.append(path)
    return paths[0], paths[1]


def recipe_without_model(folder: Path, a: Path, b: Path, steps: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(
        f"version: 1\ncheckpoints: [{{path: {a}}}, {{path: {b}}}]\n"
        "data: {eval: {source: mnist, split: '9000:9200'}}\n"
        f"steps: {steps}\noutput: {{dir: {folder / 'out'}}}\n"
    )
    return path


# A factory from a file's metadata: a shell command, and a module that acts on import.
HOSTILE = [
    ("os:system", {"command": "touch PWNED"}),
    ("hostile:build", {}),
]


@pytest.mark.parametrize(("arch", "args"), HOSTILE)
@pytest.mark.parametrize("command", ["run", "align-spec"])
def test_checkpoint_metadata_never_chooses_code(
    tmp_path: Path, arch: str, args: dict, command: str
) -> None:
    (tmp_path / "hostile.py").write_text(
        "open('PWNED', 'w').close()\ndef build(**kwargs):\n    open('PWNED', 'w').close()\n"
    )
    a, b = mlp_checkpoints(tmp_path, arch, json.dumps(args))
    recipe = recipe_without_model(tmp_path, a, b, "[merge: average, evaluate: {}]")
    line = one_line_error(run_cli(command, str(recipe), cwd=tmp_path), 2)
    assert not (tmp_path / "PWNED").exists(), "code named by a checkpoint ran"
    at = f"{recipe}:2: checkpoints.0.path: {a}: its metadata names user code"
    assert line.startswith(at) and arch in line
    assert "only a recipe may import" in line
    assert f'model: {{arch: "{arch}", args: {json.dumps(args)}}}' in line
    assert not (tmp_path / "out").exists()


def test_user_code_in_metadata_is_not_passed_on(tmp_path: Path) -> None:
    # A data-free merge builds no model: it runs, and the output does not carry the name on.
    a, b = mlp_checkpoints(tmp_path, "os:system", json.dumps({"command": "touch PWNED"}))
    recipe = recipe_without_model(tmp_path, a, b, "[merge: average]")
    run_cli("run", str(recipe), cwd=tmp_path, check=True)
    assert not (tmp_path / "PWNED").exists()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert "mergecli.arch" not in metadata and "mergecli.args" not in metadata


@pytest.mark.parametrize(
    ("args", "problem"),
    [("{depth: 2", "invalid JSON"), ("[2, 16]", "it is a JSON list"), ('"x"', "JSON str")],
)
def test_malformed_metadata_args_name_the_file(tmp_path: Path, args: str, problem: str) -> None:
    a, b = mlp_checkpoints(tmp_path, "mlp", args)
    recipe = recipe_without_model(tmp_path, a, b, "[merge: average, evaluate: {}]")
    line = one_line_error(run_cli("run", str(recipe), cwd=tmp_path), 2)
    at = f"{recipe}:2: checkpoints.0.path: {a}: metadata mergecli.args is not a mapping"
    assert line.startswith(at) and problem in line
    # The same checkpoints with well-formed arguments: a built-in named by metadata still works.
    a, b = mlp_checkpoints(tmp_path, "mlp", json.dumps(MLP_ARGS))
    run_cli("run", str(recipe), cwd=tmp_path, check=True)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["mergecli.arch"] == "mlp" and json.loads(metadata["mergecli.args"]) == MLP_ARGS


# --- report.json ----------------------------------------------------------------------------

COEFFICIENTS = {
    "reference": "a", "multi": "pairwise", "even": 0.5, "bin_edges": [0.0, 0.5, 1.0],
    "layers": [{"tensor": "w", "count": 2, "mean": 0.5, "std": 0.1, "histogram": [1, 1]}],
}  # fmt: skip


def write_report(folder: Path, report: object) -> Path:
    out = folder / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report))
    return out


@pytest.mark.parametrize("kind", ["../../escaped", "ABSOLUTE", "analysis", ""])
def test_report_analysis_kinds_are_registered_names(tmp_path: Path, kind: str) -> None:
    kind = str(tmp_path / "absolute") if kind == "ABSOLUTE" else kind
    out = write_report(tmp_path / "deep", {"name": "x", "analysis": {kind: COEFFICIENTS}})
    line = one_line_error(run_cli("report", str(out)), 1)
    assert line.startswith(f"error: {out / 'report.json'}: analysis: unknown analysis kind")
    assert json.dumps(kind) in line and "coefficients" in line
    assert not list(tmp_path.glob("**/escaped*")) and not list(tmp_path.glob("absolute*"))
    assert not (out / "report.md").exists()


def test_report_writes_only_inside_its_dir(tmp_path: Path) -> None:
    out = write_report(tmp_path, {"name": "x", "analysis": {"coefficients": COEFFICIENTS}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "analysis").symlink_to(elsewhere)
    line = one_line_error(run_cli("report", str(out)), 1)
    assert "resolves outside the output dir" in line and "analysis/coefficients.json" in line
    assert not list(elsewhere.iterdir())
    # The same report in a plain directory renders.
    (out / "analysis").unlink()
    run_cli("report", str(out), check=True)
    assert (out / "analysis" / "coefficients.png").exists() and (out / "report.md").exists()


@pytest.mark.parametrize(
    ("report", "where"),
    [
        ([1, 2], "expected a JSON object, got a JSON array"),
        ({"inputs": [{"name": "a", "path": "a.safetensors"}]}, "inputs.0.sha256: field required"),
        ({"inputs": {"name": "a"}}, "inputs: input should be a valid list"),
        ({"evaluate": {"split": "eval", "examples": 3}}, "evaluate.results: field required"),
        ({"evaluate": None}, "evaluate: input should be a valid dictionary"),
        ({"fit": {"method": "np", "stages": []}}, "fit.granularity: field required"),
        ({"repair": {"method": "repair", "head_corrected": "yes"}}, "repair.head_corrected"),
        ({"analysis": {"coefficients": {**COEFFICIENTS, "even": "half"}}}, "coefficients.even"),
        ({"analysis": {"coefficients": {**COEFFICIENTS, "bin_edges": [0]}}}, "one count per bin"),
    ],
)
def test_report_json_of_the_wrong_shape_is_one_line(
    tmp_path: Path, report: object, where: str
) -> None:
    out = write_report(tmp_path, report)
    line = one_line_error(run_cli("report", str(out)), 1)
    assert line.startswith(f"error: {out / 'report.json'}: ") and where in line


def test_every_registered_analysis_kind_has_a_report_shape() -> None:
    from mergecli.analyze.plots import PLOTS
    from mergecli.registry import methods_of
    from mergecli.report_shape import ANALYSES

    assert set(ANALYSES) == set(methods_of("analyze")) == set(PLOTS)
