"""configs/papers/ as a user with CIFAR on disk runs it: the `mergecli train` commands in each
recipe's header (shrunk: a narrow model, two epochs) train the recipe's checkpoints on generated
CIFAR-10/100 layouts, every recipe validates against them, and one runs to its table."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from fixtures.images import write_cifar
from helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs" / "papers").glob("*.yaml"))
# A width that trains in seconds: what `--arg width=` and model.args.width become.
TINY = {"resnet20": "0.25", "vgg": "0.125"}


def header_command(recipe: Path, start: str) -> list[str]:
    """The first command of the header that starts with ``start``, joined over its
    continuation lines (a trailing backslash) and split as a shell splits it."""
    lines = [line.removeprefix("#").strip() for line in recipe.read_text().splitlines()]
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    parts = []
    for line in lines[first:]:
        parts.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            break
    return shlex.split(" ".join(parts))


def header_commands(recipe: Path) -> list[list[str]]:
    """The header's `mergecli train` command, then the same with the options of its
    "(and --opt value ...)" line replaced: the two endpoints' commands, as a user copies them."""
    first = header_command(recipe, "mergecli train")[1:]  # without "mergecli"
    [other] = re.findall(r"\(and (--[^)]*)\)", recipe.read_text())
    second = list(first)
    changes = shlex.split(other)
    for option, value in zip(changes[::2], changes[1::2], strict=True):
        second[second.index(option) + 1] = value
    return [first, second]


def header_run_sets(recipe: Path) -> list[str]:
    """The `--set` options of the header's `mergecli run` command that has them (the aligned
    average followed by reset_bn)."""
    tokens = header_command(recipe, f"mergecli run configs/papers/{recipe.name} ")
    return [tokens[i + 1] for i, token in enumerate(tokens) if token == "--set"]


def shrunk(command: list[str]) -> list[str]:
    """The command with a narrow model and two epochs: the same options otherwise."""
    arch = command[command.index("--arch") + 1]
    out = list(command)
    if not any(token.startswith("width=") for token in out):  # the default width, 1
        out += ["--arg", "width=1"]
    for i, token in enumerate(out[:-1]):
        if token == "--arg" and out[i + 1].startswith("width="):
            out[i + 1] = f"width={TINY[arch]}"
        if token == "--epochs":
            out[i + 1] = "2"
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory laid out as the recipes expect (data/ with CIFAR-10 in the binary version and
    CIFAR-100 in the python version, runs/ with every recipe's checkpoints trained by its header's
    commands); the recipes run from there."""
    home = tmp_path_factory.mktemp("papers")
    write_cifar(home / "data", "cifar10", "binary", per_file=16)
    write_cifar(home / "data", "cifar100", "python", per_file=100)
    for recipe in RECIPES:
        checkpoints = [c["path"] for c in yaml.safe_load(recipe.read_text())["checkpoints"]]
        commands = [shrunk(c) for c in header_commands(recipe)]
        # The header trains exactly the checkpoints the recipe merges.
        assert [c[c.index("--out") + 1] for c in commands] == checkpoints, recipe.name
        for command in commands:
            run_cli("--log", "plain", "train", *command[1:], cwd=home, check=True)
    return home


def test_recipes_name_the_paper_and_read_cifar_from_data() -> None:
    assert {
        "cifar10-resnet20x4-np-merge",
        "cifar10-vgg16-cca-np-merge",
        "cifar100-resnet20x8-split-np-merge",
    } <= {r.stem for r in RECIPES}
    for recipe in RECIPES:
        text = recipe.read_text()
        assert "Orozco Camacho et al., 2024" in text and "mergecli run configs/papers/" in text
        loaded = yaml.safe_load(text)
        specs = [loaded["data"]["fit"], *_eval_specs(loaded["data"]["eval"])]
        assert {s["source"] for s in specs} <= {"cifar10", "cifar100"}, recipe.name
        assert {s["root"] for s in specs} == {"data"}, recipe.name
        assert loaded["model"]["arch"] in TINY
        # The header trains exactly the checkpoints the recipe merges.
        outs = [c[c.index("--out") + 1] for c in header_commands(recipe)]
        assert outs == [c["path"] for c in loaded["checkpoints"]], recipe.name


def _eval_specs(spec: dict) -> list[dict]:
    return [spec] if "source" in spec else list(spec.values())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_validates_on_a_cifar_layout(trained: Path, recipe: Path) -> None:
    arch = yaml.safe_load(recipe.read_text())["model"]["arch"]
    width = f"model.args.width={TINY[arch]}"
    result = run_cli("validate", str(recipe), "--set", width, cwd=trained)
    assert result.returncode == 0, result.stderr
    assert f"# {recipe}: valid" in result.stdout, result.stdout
    assert "names and shapes agree" in result.stdout, result.stdout


@pytest.mark.slow
def test_aligned_average_commands_replace_the_fit_by_an_average(trained: Path) -> None:
    """Each header's aligned average + reset_bn command: the same overrides in every recipe
    (its own output dir aside); validated once, on the recipe with named eval sets."""
    for recipe in RECIPES:
        sets = header_run_sets(recipe)
        assert sets[0] == "steps.1={merge: {method: average}}", (recipe.name, sets)
        assert [s.split("=")[0] for s in sets] == ["steps.1", "output.dir"], (recipe.name, sets)
    recipe = ROOT / "configs" / "papers" / "cifar100-resnet20x8-split-np-merge.yaml"
    overrides = [x for item in header_run_sets(recipe) for x in ("--set", item)]
    result = run_cli(
        "validate", str(recipe), "--set", "model.args.width=0.25", *overrides, cwd=trained
    )
    assert result.returncode == 0, result.stderr
    steps = yaml.safe_load(result.stdout)["steps"]
    assert [next(iter(step)) for step in steps] == ["align", "merge", "repair", "evaluate"]
    assert steps[1]["merge"]["method"] == "average"


@pytest.mark.slow
def test_resnet_recipe_runs_to_its_table(trained: Path) -> None:
    recipe = ROOT / "configs" / "papers" / "cifar10-resnet20x4-np-merge.yaml"
    out = trained / "out-resnet"
    result = run_cli(
        "--log", "plain", "run", str(recipe), "--set", "model.args.width=0.25",
        "--set", "data.fit.fraction=1.0", "--set", "steps.0.align.restarts=1",
        "--set", "steps.1.fit.epochs=1", "--set", f"output.dir={out}", cwd=trained,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "evaluation on data.eval (16 examples)" in result.stdout, result.stdout
    rows = json.loads((out / "report.json").read_text())["evaluate"]["results"]
    assert [(r["name"], r["kind"]) for r in rows] == [
        ("c10-resnet20x4-seed0", "endpoint"),
        ("c10-resnet20x4-seed1", "endpoint"),
        ("ensemble", "ensemble"),
        ("average", "average"),
        ("aligned average", "aligned_average"),
        ("merged (weight_matching + np_merge + reset_bn)", "merged"),
    ]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert (out / "model.safetensors").is_file() and (out / "coefficients.safetensors").is_file()
