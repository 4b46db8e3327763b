"""Several named eval sets (`data.eval: {name: spec, ...}`): the classification table gains a
`set` column whose rows are each set's own evaluation, validate checks every set, and a step
that reads one eval set says so in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli

SETS = {"low": "9000:9400", "high": "9600:"}


def recipe(tmp_path: Path, pair: tuple[Path, Path], eval_block: str, steps: str, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"""\
version: 1
name: {name}
model: {{arch: mlp, args: {{depth: 3, hidden: 32}}}}
checkpoints: [{{path: {pair[0]}}}, {{path: {pair[1]}}}]
data:
  eval:{eval_block}
steps:
  - merge: average
{steps}
output: {{dir: {tmp_path / name}}}
"""
    )
    return path


NAMED = "".join(
    f'\n    {n}: {{source: mnist, split: "{s}", batch_size: 128}}' for n, s in SETS.items()
)
EVALUATE = "  - evaluate: {baselines: [endpoints, ensemble, average]}"


@pytest.mark.slow
def test_each_named_set_is_evaluated_as_it_would_be_alone(tmp_path: Path, trained_pair) -> None:
    result = run_cli("run", str(recipe(tmp_path, trained_pair, NAMED, EVALUATE, "named")))
    assert result.returncode == 0, result.stderr
    assert "evaluation on data.eval (low: 400 examples, high: 400 examples)" in result.stdout
    header = next(line for line in result.stdout.splitlines() if "accuracy" in line)
    assert header.split()[1] == "set", header
    report = json.loads((tmp_path / "named" / "report.json").read_text())["evaluate"]
    assert report["sets"] == {"low": 400, "high": 400}
    rows = report["results"]
    assert [r["set"] for r in rows] == ["low"] * 5 + ["high"] * 5
    # the second set's rows are what a recipe with that set alone reports, bit for bit
    alone = recipe(tmp_path, trained_pair, ' {source: mnist, split: "9600:"}', EVALUATE, "alone")
    assert run_cli("run", str(alone)).returncode == 0
    single = json.loads((tmp_path / "alone" / "report.json").read_text())["evaluate"]
    assert "sets" not in single and all("set" not in r for r in single["results"])
    own = [{k: v for k, v in r.items() if k != "set"} for r in rows if r["set"] == "high"]
    assert own == single["results"]
    # report.md is drawn again from report.json alone, with the set column
    assert run_cli("report", str(tmp_path / "named")).returncode == 0
    markdown = (tmp_path / "named" / "report.md").read_text()
    assert "On data.eval: low (400 examples), high (400 examples)." in markdown
    assert "| set | model | kind | accuracy |" in markdown


@pytest.mark.slow
def test_validate_checks_every_set_and_one_set_steps_refuse_several(
    tmp_path: Path, trained_pair
) -> None:
    bad = NAMED.replace('split: "9600:"', 'split: "9600:99999"')
    result = run_cli("validate", str(recipe(tmp_path, trained_pair, bad, EVALUATE, "bad")))
    assert result.returncode == 2, result.stderr
    assert "data.eval.high.split: '9600:99999' is out of range" in result.stderr

    result = run_cli("validate", str(recipe(tmp_path, trained_pair, NAMED, EVALUATE, "ok")))
    assert result.returncode == 0, result.stderr
    assert "data.eval.low: mnist split 9000:9400, inputs [1, 28, 28] fit the model" in result.stdout

    analysis = "  - analyze: {method: scaling}"
    result = run_cli("run", str(recipe(tmp_path, trained_pair, NAMED, analysis, "one-set")))
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line[:4].isdigit()]
    assert lines == [
        "error: steps.1 (analyze scaling): data.eval: this step reads one eval set, the recipe "
        "names 2 (low, high); give data.eval one set for it"
    ], result.stderr
