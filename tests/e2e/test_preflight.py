"""The newcomer's mistakes, as a user makes them (issue 16): `validate` catches what `run` would
(one `file:line` line, exit 2) and `run` makes the same checks before touching anything; a
model that does not take the data names the argument to change; `align-spec` previews a model
before any checkpoint exists; defaults are shown as what they do; where a run writes is not
part of the recipe's hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import error_line, mlp_checkpoint, run_cli, run_cli_in_process

MLP = {"depth": 3, "hidden": 16}


def checkpoint(path: Path, seed: int, **args: int) -> Path:
    """A seeded small MLP (untrained: names and shapes are what is checked)."""
    return mlp_checkpoint(path, seed, **{**MLP, **args})


RECIPE = """\
version: 1
model: {{arch: {arch}, args: {{depth: 3, hidden: {hidden}}}}}
checkpoints:
  - path: {a}
  - path: {b}
data:
  fit: {{source: mnist, split: "0:200"}}
  eval: {{source: tensors, path: {eval_path}}}
steps:
  - fit: {{steps: 2}}
  - evaluate: {{baselines: [endpoints]}}
output: {{dir: {out}}}
"""


def write(tmp_path: Path, **changes: object) -> Path:
    """The recipe above over two good checkpoints and good data, with ``changes``."""
    eval_path = tmp_path / "eval.safetensors"
    if not eval_path.exists():
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(32, 784, generator=generator)
        save_file({"x": x, "y": torch.randint(0, 10, (32,), generator=generator)}, eval_path)
    fields = {
        "arch": "mlp",
        "hidden": 16,
        "a": checkpoint(tmp_path / "a.safetensors", 0),
        "b": checkpoint(tmp_path / "b.safetensors", 1),
        "eval_path": eval_path,
        "out": tmp_path / "out",
        **changes,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(**fields))
    return path


def narrow_eval(tmp_path: Path) -> dict[str, object]:
    path = tmp_path / "narrow.safetensors"
    save_file({"x": torch.zeros(8, 100), "y": torch.zeros(8, dtype=torch.int64)}, path)
    return {"eval_path": path}


# Each mistake: the recipe change, then the line and key it is reported at and what it says.
MISTAKES = {
    "missing checkpoint": (
        lambda t: {"b": t / "nope.safetensors"},
        "5: checkpoints.1.path:",
        "no such file or directory",
    ),
    "unknown arch": (lambda t: {"arch": "mpl"}, "2: model.arch:", "did you mean 'mlp'"),
    "checkpoints of different shapes": (
        lambda t: {"b": checkpoint(t / "wide.safetensors", 1, hidden=32)},
        "5: checkpoints.1.path:",
        "has shape (32, 784)",
    ),
    "model args that do not fit": (
        lambda t: {"hidden": 24},
        "2: model.args:",
        "the model expects (24, 784)",
    ),
    "missing data file": (
        lambda t: {"eval_path": t / "nope.npz"},
        "8: data.eval.path:",
        "file not found",
    ),
    "data the model does not take": (
        narrow_eval,
        "8: data.eval:",
        "inputs of shape [100] per example do not fit model mlp",
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_validate_and_run_report_it_at_its_line(tmp_path: Path, mistake: str) -> None:
    change, where, what = MISTAKES[mistake]
    recipe = write(tmp_path, **change(tmp_path))
    line = error_line(run_cli("validate", str(recipe)), 2)
    assert line.startswith(f"{recipe}:{where}") and what in line, line
    # run makes the same checks first: the same line, before any step or output (a real
    # process for the first mistake; the others in process, sparing a torch import each).
    first = mistake == next(iter(MISTAKES))
    result = (run_cli if first else run_cli_in_process)("run", str(recipe))
    assert error_line(result, 2) == line
    assert "step 0" not in result.stderr and not (tmp_path / "out").exists()


def test_validate_lists_every_problem_and_what_it_checked(tmp_path: Path) -> None:
    recipe = write(tmp_path, arch="mpl", b=tmp_path / "nope.safetensors")
    result = run_cli("validate", str(recipe))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert [line.split(": ")[1] for line in lines] == ["checkpoints.1.path", "model.arch"]
    good = run_cli("validate", str(write(tmp_path, b=tmp_path / "b.safetensors")), check=True)
    assert "# model: mlp (built on the meta device) fits every checkpoint" in good.stdout
    assert "# data.eval: tensors file" in good.stdout and "inputs [784] fit" in good.stdout


def test_sha256_pin_is_checked_at_its_line(tmp_path: Path) -> None:
    recipe = write(tmp_path)
    text = recipe.read_text().replace("  - path: " + str(tmp_path / "b.safetensors"), "")
    pinned = text.replace(
        f"  - path: {tmp_path / 'a.safetensors'}\n",
        f'  - path: {tmp_path / "a.safetensors"}\n    sha256: "{"0" * 64}"\n'
        f"  - path: {tmp_path / 'b.safetensors'}\n",
    )
    recipe.write_text(pinned)
    line = error_line(run_cli("validate", str(recipe)), 2)
    assert line.startswith(f"{recipe}:5: checkpoints.0.sha256:") and "pins 000" in line, line


def test_train_on_images_the_model_does_not_take_names_the_argument(tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    result = run_cli(
        "train", "--arch", "resnet20", "--data", "mnist:0:64", "--eval-data", "none",
        "--epochs", "1", "--out", str(out),
    )  # fmt: skip
    line = error_line(result, 1)
    for needle in ("model resnet20", "[1, 28, 28]", "3 channels", "set --arg in_channels=1"):
        assert needle in line, line
    assert not out.exists()


def test_recipe_data_the_model_does_not_take_names_the_recipe_key(tmp_path: Path) -> None:
    line = error_line(run_cli("validate", str(write(tmp_path, **narrow_eval(tmp_path)))), 2)
    assert "set model.args.in_features: 100 for these inputs" in line, line
    assert "takes 784 features" in line, line


PREVIEW = """\
version: 1
model: {arch: resnet20, args: {in_channels: 1}, input_shape: [1, 28, 28]}
checkpoints:
  - path: runs/not-trained-yet.safetensors
steps:
  - align: weight_matching
"""


@pytest.mark.parametrize("listed", [True, False])
def test_align_spec_previews_the_model_before_any_checkpoint(tmp_path: Path, listed) -> None:
    listing = "checkpoints:\n  - path: runs/not-trained-yet.safetensors\n"
    (tmp_path / "recipe.yaml").write_text(PREVIEW if listed else PREVIEW.replace(listing, ""))
    result = run_cli("--log", "json", "align-spec", "recipe.yaml", cwd=tmp_path, check=True)
    assert "no checkpoint exists yet" in result.stderr
    table = json.loads(result.stdout)
    groups = {row["group"]: row["units"] for row in table["rows"]}
    assert groups["conv"] == 16 and len(groups) > 3, groups
    assert not (tmp_path / "out").exists()


def test_align_spec_without_checkpoints_or_model_says_what_to_add(tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_text(PREVIEW.replace(PREVIEW.splitlines()[1] + "\n", ""))
    line = error_line(run_cli("align-spec", "recipe.yaml", cwd=tmp_path), 2)
    assert line.startswith("recipe.yaml:2: checkpoints:") and "`model:" in line, line


def test_defaults_are_shown_as_what_they_do(tmp_path: Path) -> None:
    listing = run_cli("--log", "json", "methods", check=True).stdout
    rows = [row for row in map(json.loads, listing.splitlines()) if "rows" in row][0]["rows"]
    fit = next(row for row in rows if row["method"].startswith("np_merge"))
    fit["parameters"] = " ".join(fit["parameters"])  # JSON tables carry one entry per parameter
    assert "init=k/(k+1) per stage (0.5 for two models)" in fit["parameters"], fit
    assert "seed=the recipe's seed" in fit["parameters"], fit
    assert "=None" not in fit["parameters"].replace("from=None", ""), fit
    recipe = write(tmp_path)
    resolved = run_cli("validate", str(recipe), "--set", "seed=7", check=True).stdout
    fit_step = resolved[resolved.index("- fit:") : resolved.index("- evaluate:")]
    assert "    seed: 7\n" in fit_step and "    init: 0.5\n" in fit_step, fit_step
    joint = run_cli("validate", str(recipe), "--set", "steps.0.fit.multi=joint", check=True)
    assert "init: null  # joint starts uniform" in joint.stdout


def test_recipe_sha256_leaves_out_where_the_run_writes(tmp_path: Path) -> None:
    a, b = checkpoint(tmp_path / "a.safetensors", 0), checkpoint(tmp_path / "b.safetensors", 1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"version: 1\ncheckpoints: [{{path: {a}}}, {{path: {b}}}]\nsteps: [merge: average]\n"
    )

    def digest(*sets: str) -> str:
        run_cli("run", str(recipe), *[f"--set={s}" for s in sets], check=True)
        out = next(s.partition("=")[2] for s in sets if s.startswith("output.dir="))
        return json.loads((Path(out) / "report.json").read_text())["recipe_sha256"]

    first = digest(f"output.dir={tmp_path / 'one'}")
    assert digest(f"output.dir={tmp_path / 'two'}") == first
    assert digest(f"output.dir={tmp_path / 'three'}", "seed=1") != first
