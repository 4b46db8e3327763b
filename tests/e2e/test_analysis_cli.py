"""The analyses as a user runs them: a greedy soup is never reported on the data that chose it,
scaling settings that would draw the same panel twice are refused before anything runs, and merge
methods listed as baselines beside the soups are the merges a `merge` step makes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import run_cli, run_cli_in_process
from mergecli.data import load_data
from mergecli.models import build_model

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


# Small splits for the merge-baseline tests: the fine-tunes' own 0:3000 is not held out, which
# does not matter here (only equality with a merge made by hand is tested).
SMALL = (
    "data:\n  fit: {source: mnist, split: '0:300'}\n  eval: {source: mnist, split: '9000:9500'}\n"
)
# Each method and its parameters, as a baseline `{method: {params}}` and as a merge step.
MERGES = {"ties": "density: 0.5", "fisher": "examples: 100", "regmean": "examples: 100, alpha: 0.9"}


def triple_recipe(directory: Path, base: Path, a: Path, b: Path, steps: str) -> Path:
    path = directory / "recipe.yaml"
    path.write_text(
        f"{HEAD}checkpoints:\n  - {{path: {base}, role: base}}\n  - path: {a}\n  - path: {b}\n"
        f"{SMALL}steps:\n{steps}output: {{dir: {directory / 'out'}}}\n"
    )
    return path


def by_hand(weights: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on the eval split, computed here in one batch."""
    model = build_model("mlp", {"depth": 3, "hidden": 32})
    model.load_state_dict(weights)
    data = load_data({"source": "mnist", "split": "9000:9500"})
    with torch.no_grad():
        logits = model(data.x).float()
    loss = F.cross_entropy(logits, data.y).item()
    return loss, (logits.argmax(1) == data.y).float().mean().item()


@pytest.mark.slow
def test_merge_baselines_are_the_merges_a_merge_step_makes(
    tmp_path: Path, finetuned_triple
) -> None:
    base, a, b = finetuned_triple
    listed = ", ".join(f"{{{method}: {{{options}}}}}" for method, options in MERGES.items())
    step = f"  - analyze: {{method: averaging_vs_ensembling, baselines: [{listed}]}}\n"
    result = run_cli_in_process("run", str(triple_recipe(tmp_path, base, a, b, step)))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out/report.json").read_text())
    rows = report["analysis"]["averaging_vs_ensembling"]["results"]
    merges = [r for r in rows if r["kind"] == "merge"]
    # After the soups, before the ensembles, in the order listed; named with their parameters.
    kinds = [r["kind"] for r in rows]
    assert kinds[: kinds.index("merge")] == ["model", "model", "uniform_soup", "greedy_soup"]
    assert [r["method"] for r in merges] == list(MERGES)
    assert merges[0]["name"] == "ties (density=0.5)"
    # The rows read the eval split as computed here: the first model's row equals ours.
    loss, accuracy = by_hand(load_file(a))
    assert rows[0]["loss"] == pytest.approx(loss, abs=1e-5)
    # Each merge row is the merge a `merge` step with the same method writes, measured here.
    # Tolerances: the same float32 weights in other batches differ by rounding (~1e-6) in the
    # logits, so 1e-5 in the loss; an example whose top two logits are that close could flip,
    # so the accuracy (of 500 examples) to one example.
    for (method, options), row in zip(MERGES.items(), merges, strict=True):
        out = tmp_path / method
        out.mkdir()
        step = f"  - merge: {{method: {method}, {options}}}\n"
        recipe = triple_recipe(out, base, a, b, step)
        result = run_cli_in_process("run", str(recipe))
        assert result.returncode == 0, result.stderr
        loss, accuracy = by_hand(load_file(out / "out/model.safetensors"))
        assert row["loss"] == pytest.approx(loss, abs=1e-5), method
        assert row["accuracy"] == pytest.approx(accuracy, abs=1.01 / 500), method
    # The table and the plot show them beside the soups.
    assert "ties (density=0.5)" in (tmp_path / "out/report.md").read_text()
    assert (tmp_path / "out/analysis/averaging_vs_ensembling.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("baselines", "message"),
    [
        ("[tiez]", "steps.0.analyze.baselines.0: unknown baseline 'tiez'; use a merge method"),
        ("[average, ties]", "steps.0.analyze.baselines.1: ties needs a base model"),
        ("[{regmean: {alpha: 2}}]", "steps.0.analyze.baselines.0: regmean: alpha:"),
        ("[{aligned_ties: {density: 0.5}, average: {}}]", "a baseline with parameters is one"),
    ],
)
def test_bad_merge_baselines_are_one_line_at_validate(
    tmp_path: Path, trained_pair, baselines: str, message: str
) -> None:
    a, b = trained_pair
    step = f"averaging_vs_ensembling\n      baselines: {baselines}"
    result = run_cli_in_process("validate", str(recipe(tmp_path, a, b, BOTH, step)))
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert message in line, line
