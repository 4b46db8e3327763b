"""The analyses as a user runs them: a greedy soup is never reported on the data that chose it,
and scaling settings that would draw the same panel twice are refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run_cli

HEAD = "version: 1\nname: split\nmodel: {arch: mlp, args: {depth: 3, hidden: 32}}\n"


def recipe(directory: Path, a: Path, b: Path, data: str, step: str) -> Path:
    path = directory / "analysis.yaml"
    path.write_text(
        f"{HEAD}checkpoints:\n  - path: {a}\n  - path: {b}\n{data}steps:\n  - analyze:\n"
        f"      method: {step}\noutput: {{dir: {directory / 'out'}}}\n"
    )
    return path


EVAL_ONLY = "data:\n  eval: {source: mnist, split: '9000:'}\n"
BOTH = "data:\n  fit: {source: mnist, split: '0:1000'}\n  eval: {source: mnist, split: '9000:'}\n"


def test_greedy_soup_without_held_out_data_is_refused(tmp_path: Path, trained_pair) -> None:
    a, b = trained_pair
    # This used to run, selecting the soup on data.eval and reporting it there; now the line
    # of the step says why not (the recipe has no `select_on` key to point at).
    result = run_cli("run", str(recipe(tmp_path, a, b, EVAL_ONLY, "averaging_vs_ensembling")))
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"{tmp_path / 'analysis.yaml'}:10: steps.0.analyze.select_on: "
                           "data.fit is missing: the greedy soup picks its ingredients on "
                           "data.fit and is reported on data.eval")  # fmt: skip
    assert "add `data: {fit: {source: ...}}`" in line
    assert not (tmp_path / "out").exists()


def test_selecting_and_reporting_on_one_split_is_refused(tmp_path: Path, trained_pair) -> None:
    a, b = trained_pair
    step = "averaging_vs_ensembling\n      select_on: eval"
    result = run_cli("validate", str(recipe(tmp_path, a, b, BOTH, step)))
    assert result.returncode == 2
    assert (f"{tmp_path / 'analysis.yaml'}:13: steps.0.analyze.select_on: the greedy soup "
            "would pick its ingredients on data.eval, the data it is reported on"
            ) in result.stderr  # fmt: skip
    # And the same through --set, named as the override.
    plain = recipe(tmp_path, a, b, BOTH, "averaging_vs_ensembling")
    result = run_cli("validate", str(plain), "--set", "steps.0.analyze.report_on=fit")
    assert result.returncode == 2 and "the data it is reported on" in result.stderr


def test_greedy_soup_selects_on_fit_and_reports_on_eval(tmp_path: Path, trained_pair) -> None:
    a, b = trained_pair
    run_cli("run", str(recipe(tmp_path, a, b, BOTH, "averaging_vs_ensembling")), check=True)
    out = tmp_path / "out"
    entry = json.loads((out / "report.json").read_text())["analysis"]["averaging_vs_ensembling"]
    greedy = next(r for r in entry["results"] if r["kind"] == "greedy_soup")
    assert (entry["split"], greedy["selected_on"]) == ("eval", "fit")
    assert entry["data"] == {"fit": "MNIST 0:1000", "eval": "MNIST 9000:"}
    assert ("On MNIST 9000: (eval), unaligned weights. The greedy soup chose its ingredients on "
            "MNIST 0:1000 (fit).") in (out / "report.md").read_text()  # fmt: skip


def test_scaling_settings_that_scale_the_same_models_are_refused(
    tmp_path: Path, trained_pair
) -> None:
    a, b = trained_pair
    step = "scaling\n      apply_to: [all, first, all_but_last]"
    result = run_cli("validate", str(recipe(tmp_path, a, b, BOTH, step)))
    assert result.returncode == 2
    assert (f"{tmp_path / 'analysis.yaml'}:13: steps.0.analyze.apply_to.2: first and "
            "all_but_last scale the same models with 2 to merge; list one of them"
            ) in result.stderr  # fmt: skip
