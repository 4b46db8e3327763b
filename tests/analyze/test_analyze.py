"""The evaluate metrics and the `analyze` kinds, checked against independent computations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import run_cli
from mergecli.analyze.interpolation import barriers
from mergecli.analyze.scaling import scale_state_dict
from mergecli.evaluate.metrics import expected_calibration_error, per_class_accuracy
from mergecli.models import build_model


def test_ece_matches_a_loop_over_bins() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=generator) * 3
    labels = torch.randint(0, 10, (500,), generator=generator)
    confidence, predicted = F.softmax(logits, 1).max(1)
    expected = 0.0
    for b in range(15):
        low, high = b / 15, (b + 1) / 15
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            gap = (predicted[inside] == labels[inside]).float().mean() - confidence[inside].mean()
            expected += inside.float().mean().item() * abs(gap.item())
    assert expected_calibration_error(logits, labels) == pytest.approx(expected, abs=1e-6)
    # A perfectly confident, always right model is perfectly calibrated.
    assert expected_calibration_error(F.one_hot(labels, 10) * 100.0, labels) < 1e-6


def test_per_class_accuracy() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 2])
    per_class = per_class_accuracy(F.one_hot(predicted, 3).float(), labels)
    assert per_class == {0: 0.5, 1: pytest.approx(2 / 3), 2: 1.0}


def test_barrier_of_a_straight_loss_line_is_zero_and_of_a_bump_its_height() -> None:
    lambdas = torch.linspace(0, 1, 5).tolist()
    flat = barriers(lambdas, [1.0, 1.25, 1.5, 1.75, 2.0], [0.9] * 5, {"loss": 1.5})
    assert flat["loss_barrier"] == pytest.approx(0) and flat["loss_barrier_midpoint"] == 0
    bump = barriers(lambdas, [1.0, 2.0, 3.5, 2.0, 1.0], [0.9, 0.5, 0.2, 0.5, 0.9], {"loss": 3.5})
    assert bump["loss_barrier"] == pytest.approx(2.5) and bump["accuracy_barrier"] == 0.7


def test_scaling_by_one_changes_nothing_and_bn_variance_scales_by_c_squared() -> None:
    model = build_model("resnet20", {"width": 1}).state_dict()
    assert all(torch.equal(a, b) for a, b in zip(scale_state_dict(model, 1.0).values(),
                                                 model.values(), strict=True))  # fmt: skip
    scaled = scale_state_dict(model, 3.0)
    name = next(n for n in model if n.endswith("running_var"))
    torch.testing.assert_close(scaled[name], model[name] * 9)
    counter = next(n for n in model if n.endswith("num_batches_tracked"))
    assert torch.equal(scaled[counter], model[counter])
    weight = next(n for n in model if n.endswith("conv1.weight") or n.endswith(".weight"))
    torch.testing.assert_close(scaled[weight], model[weight] * 3)


def analysis_recipe(directory: Path, a: Path, b: Path, steps: str, data: str | None = None) -> Path:
    path = directory / "analysis.yaml"
    fit, evaluation = '{source: mnist, split: "0:1500"}', '{source: mnist, split: "9000:"}'
    data = data or f"data:\n  fit: {fit}\n  eval: {evaluation}\n"
    path.write_text(
        "version: 1\nname: analysis-test\nmodel: {arch: mlp, args: {depth: 3, hidden: 32}}\n"
        f"checkpoints:\n  - path: {a}\n  - path: {b}\n{data}steps:\n{steps}"
        f"output: {{dir: {directory / 'out'}}}\n"
    )
    return path


def report_of(directory: Path) -> dict:
    return json.loads((directory / "out" / "report.json").read_text())


@pytest.mark.slow
def test_every_kind_end_to_end_with_report_and_plots(tmp_path: Path, trained_pair) -> None:
    a, b = trained_pair
    steps = (
        "  - align: {method: weight_matching}\n"
        "  - fit: {method: np_merge, steps: 20, lr: 0.05}\n"
        "  - evaluate: {baselines: [ensemble, endpoints, logit_ensemble, aligned_average]}\n"
        "  - analyze: {method: interpolation, points: 5}\n"
        "  - analyze: {method: averaging_vs_ensembling}\n"
        "  - analyze: {method: scaling, factors: [0.5, 1.0, 2.0]}\n"
        "  - analyze: {method: templates, units: 4}\n"
        "  - analyze: {method: coefficients, bins: 10}\n"
    )
    run_cli("--log", "plain", "run", str(analysis_recipe(tmp_path, a, b, steps)), check=True)
    report = report_of(tmp_path)
    kinds = [r["kind"] for r in report["evaluate"]["results"]]
    assert kinds == ["ensemble", "endpoint", "endpoint", "logit_ensemble", "aligned_average",
                     "merged"]  # fmt: skip
    row = report["evaluate"]["results"][-1]
    assert set(row["per_class_accuracy"]) == {str(c) for c in range(10)} and 0 <= row["ece"] < 1
    analysis = report["analysis"]
    paths = analysis["interpolation"]["paths"]
    assert set(paths) == {"naive", "aligned", "fit"}
    assert paths["aligned"]["eval"]["loss_barrier"] < paths["naive"]["eval"]["loss_barrier"]
    greedy = next(r for r in analysis["averaging_vs_ensembling"]["results"]
                  if r["kind"] == "greedy_soup")  # fmt: skip
    selection = greedy["selection_accuracy"]
    assert selection["soup"] >= max(v for k, v in selection.items() if k != "soup")
    at_one = [r for r in analysis["scaling"]["results"] if r["factor"] == 1.0]
    assert at_one and all(r["agreement"] == 1.0 for r in at_one)
    unscaled = analysis["scaling"]["unscaled_accuracy"]
    assert all(r["accuracy"] == unscaled[r["subject"]] for r in at_one)
    templates = analysis["templates"]
    assert templates["layer"] == "layers.0.weight" and len(templates["templates"]) == 4
    assert templates["pair"]["mean_cosine_after"] > templates["pair"]["mean_cosine_before"]
    assert sum(analysis["coefficients"]["layers"][0]["histogram"]) == 784 * 32
    out = tmp_path / "out"
    for kind in analysis:
        assert (out / "analysis" / f"{kind}.png").stat().st_size > 10_000
        assert json.loads((out / "analysis" / f"{kind}.json").read_text()) == analysis[kind]
    markdown = (out / "report.md").read_text()
    assert "![interpolation](analysis/interpolation.png)" in markdown and "| ECE |" in markdown
    # `mergecli report` redraws everything from report.json alone.
    for path in [out / "report.md", *(out / "analysis").iterdir()]:
        path.unlink()
    run_cli("report", str(out), check=True)
    assert (out / "report.md").read_text() == markdown
    assert (out / "analysis" / "templates.png").exists()


@pytest.mark.slow
def test_barrier_between_a_model_and_itself_is_zero(tmp_path: Path, trained_pair) -> None:
    a, _ = trained_pair
    steps = "  - analyze: {method: interpolation, points: 5}\n"
    run_cli("run", str(analysis_recipe(tmp_path, a, a, steps)), check=True)
    curve = report_of(tmp_path)["analysis"]["interpolation"]["paths"]["naive"]["eval"]
    assert abs(curve["loss_barrier"]) < 1e-5 and abs(curve["loss_barrier_midpoint"]) < 1e-5
    assert max(curve["accuracy"]) == min(curve["accuracy"])


def test_feature_ensemble_of_identical_models_is_the_model(tmp_path: Path, trained_pair) -> None:
    a, _ = trained_pair
    steps = "  - analyze: {method: averaging_vs_ensembling}\n"
    run_cli("run", str(analysis_recipe(tmp_path, a, a, steps)), check=True)
    rows = {r["kind"]: r for r in report_of(tmp_path)["analysis"]["averaging_vs_ensembling"]
            ["results"]}  # fmt: skip
    model = rows["model"]["accuracy"]
    for kind in ("uniform_soup", "greedy_soup", "logit_ensemble", "feature_ensemble_first_head",
                 "feature_ensemble_averaged_head"):  # fmt: skip
        assert rows[kind]["accuracy"] == pytest.approx(model), kind


def test_analysis_errors(tmp_path: Path, trained_pair) -> None:
    a, b = trained_pair
    one = tmp_path / "one.yaml"
    one.write_text(
        "version: 1\nmodel: {arch: mlp, args: {depth: 3, hidden: 32}}\n"
        f"checkpoints: [{{path: {a}}}]\ndata: {{eval: {{source: mnist, split: '9000:'}}}}\n"
        "steps:\n  - analyze: {method: interpolation}\n"
        f"output: {{dir: {tmp_path / 'one'}}}\n"
    )
    result = run_cli("run", str(one))
    assert result.returncode == 1
    assert "interpolation needs at least 2 checkpoints to merge, the recipe has 1" in result.stderr
    steps = "  - analyze: {method: templates, layer: layers.1.weight}\n"
    result = run_cli("run", str(analysis_recipe(tmp_path, a, b, steps)))
    assert result.returncode == 1 and "cannot be shown as [28, 28] images" in result.stderr
    assert "Traceback" not in result.stderr
    no_data = analysis_recipe(tmp_path, a, b, "  - analyze: {method: scaling}\n", data="\n")
    result = run_cli("run", str(no_data))
    assert result.returncode == 2
    assert "analysis.yaml:9: steps.0.analyze: scaling needs data" in result.stderr
    unknown = analysis_recipe(tmp_path, a, b, "  - analyze: {method: interpolations}\n")
    result = run_cli("validate", str(unknown))
    assert result.returncode == 2 and "did you mean 'interpolation'" in result.stderr
    coefficients = analysis_recipe(tmp_path, a, b, "  - analyze: {method: coefficients}\n")
    result = run_cli("run", str(coefficients))
    assert result.returncode == 1 and "needs a `fit` step before it" in result.stderr
    assert not (tmp_path / "out" / "report.json").exists()
    result = run_cli("report", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "give the output dir of a finished" in result.stderr
