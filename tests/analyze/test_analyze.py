"""The evaluate metrics and the `analyze` kinds, checked against independent computations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import run_cli, run_cli_in_process, run_cli_side_by_side
from mergecli.analyze.ensembles import (
    FEATURE_AVERAGED,
    FEATURE_FIRST,
    LOGIT,
    OUTPUT,
    ensembles,
    head_of,
)
from mergecli.analyze.interpolation import barriers
from mergecli.analyze.plots import FIGURES, MAX_WIDTH, MIN_FONT
from mergecli.analyze.scaling import DEFAULT_TARGETS, scale_state_dict, scaled_models
from mergecli.analyze.templates import centred_class_means, match_classes
from mergecli.evaluate.metrics import (
    accuracy,
    expected_accuracy,
    expected_calibration_error,
    per_class_accuracy,
)
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


def test_expected_accuracy_counts_a_tie_of_k_classes_as_one_kth() -> None:
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 3.0, 3.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 0, 2, 1])
    # Row by row: 1/2 (label among two tied), 0, 1/3, 1 (no tie).
    assert expected_accuracy(scores, labels) == pytest.approx((0.5 + 0 + 1 / 3 + 1) / 4)
    # Without ties it is plain accuracy.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 10, generator=generator)
    labels = torch.randint(0, 10, (300,), generator=generator)
    assert expected_accuracy(logits, labels) == accuracy(logits, labels)


def test_a_saturated_output_ensemble_ties_and_the_tie_goes_to_no_class() -> None:
    # Two confident models that disagree: model A says 0, model B says 3, the label is 3.
    a = torch.zeros(4, 5).index_fill_(1, torch.tensor([0]), 1e4)
    b = torch.zeros(4, 5).index_fill_(1, torch.tensor([3]), 1e4)
    labels = torch.full((4,), 3)
    heads = [(torch.eye(5), None), (torch.eye(5), None)]
    output = ensembles([a, b], [a, b], heads)[OUTPUT]
    assert accuracy(output, labels) == 0.0  # argmax hands the exact tie to class 0
    assert expected_accuracy(output, labels) == 0.5


def test_ensembles_match_their_formulas() -> None:
    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(20, 6, generator=generator) for _ in range(3)]
    heads = [(torch.randn(4, 6, generator=generator), torch.randn(4, generator=generator))
             for _ in range(3)]  # fmt: skip
    logits = [f @ w.T + b for f, (w, b) in zip(features, heads, strict=True)]
    found = ensembles(logits, features, heads)
    # Independent formulas, per example and class, in float64.
    probabilities = sum(F.softmax(z.double(), 1) for z in logits) / 3
    torch.testing.assert_close(F.softmax(found[OUTPUT].double(), 1), probabilities)
    torch.testing.assert_close(found[LOGIT], (logits[0] + logits[1] + logits[2]) / 3)
    mean_features = (features[0] + features[1] + features[2]) / 3
    w0, b0 = heads[0]
    torch.testing.assert_close(found[FEATURE_FIRST], F.linear(mean_features, w0, b0))
    mean_weight = (heads[0][0] + heads[1][0] + heads[2][0]) / 3
    mean_bias = (heads[0][1] + heads[1][1] + heads[2][1]) / 3
    torch.testing.assert_close(
        found[FEATURE_AVERAGED], F.linear(mean_features, mean_weight, mean_bias)
    )
    # Models sharing one head: the feature ensemble is the logit ensemble (the head is linear).
    shared = [(heads[0][0], heads[0][1])] * 3
    same_head = ensembles([f @ w0.T + b0 for f in features], features, shared)
    torch.testing.assert_close(same_head[FEATURE_AVERAGED], same_head[LOGIT])


def test_head_of_reads_weight_and_optional_bias() -> None:
    weight, bias = torch.ones(2, 3), torch.zeros(2)
    assert head_of({"head.weight": weight, "head.bias": bias}, "head") == (weight, bias)
    assert head_of({"weight": weight}, "") == (weight, None)


def test_centred_class_means_sum_to_zero_and_rows_match_their_class() -> None:
    generator = torch.Generator().manual_seed(2)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    background = torch.rand(16, generator=generator) * 5  # what every uncentred mean shares
    x = background + torch.randn(9, 16, generator=generator)
    means = centred_class_means(x, y, [0, 1, 2])
    torch.testing.assert_close(means[1], x[3:5].mean(0) - x.mean(0))
    # Centred on the mean of all examples: the class means weighted by class size sum to zero.
    counts = torch.tensor([3.0, 2.0, 4.0])
    torch.testing.assert_close(counts @ means, torch.zeros(16), atol=1e-5, rtol=0)
    # A row drawing class 2's centred mean matches class 2 with cosine 1; a classifier's row k
    # is compared with class k whatever it looks like.
    rows = torch.stack([means[2] * 3, means[0]])
    index, cosine = match_classes(rows, means, per_class=False)
    assert index.tolist() == [2, 0] and cosine.tolist() == pytest.approx([1.0, 1.0])
    index, cosine = match_classes(rows, means[:2], per_class=True)
    assert index.tolist() == [0, 1]
    # Two float32 routes to a cosine of 16-dim vectors: they differ by a few ulps (~1e-7).
    expected = float(F.cosine_similarity(means[2], means[0], dim=0))
    assert cosine[0] == pytest.approx(expected, abs=1e-6)
    # Uncentred, the shared background makes every class look alike (the bug centring fixes).
    uncentred = means + x.mean(0)
    similarity = F.normalize(uncentred, dim=1) @ F.normalize(uncentred, dim=1).T
    assert similarity.min() > 0.9


def test_scaling_targets_name_distinct_models() -> None:
    two = {t: list(scaled_models(t, 2)) for t in ("all", "first", "last", "all_but_first",
                                                   "all_but_last")}  # fmt: skip
    assert two == {"all": [0, 1], "first": [0], "last": [1], "all_but_first": [1],
                   "all_but_last": [0]}  # fmt: skip
    # The defaults scale different models for any number of them from two up.
    for n in (2, 3, 5):
        chosen = [tuple(scaled_models(t, n)) for t in DEFAULT_TARGETS]
        assert len(set(chosen)) == len(chosen)
    assert list(scaled_models("all_but_last", 4)) == [0, 1, 2]
    assert list(scaled_models("all_but_first", 4)) == [1, 2, 3]


def test_barrier_of_a_straight_loss_line_is_zero_and_of_a_bump_its_height() -> None:
    lambdas = torch.linspace(0, 1, 5).tolist()
    flat = barriers(lambdas, [1.0, 1.25, 1.5, 1.75, 2.0], [0.9] * 5, {"loss": 1.5})
    assert flat["loss_barrier"] == pytest.approx(0) and flat["loss_barrier_midpoint"] == 0
    bump = barriers(lambdas, [1.0, 2.0, 3.5, 2.0, 1.0], [0.9, 0.5, 0.2, 0.5, 0.9], {"loss": 3.5})
    # 0.9 - 0.2 in float64: 0.7 to within an ulp or two, not necessarily 0.7's double.
    assert bump["loss_barrier"] == pytest.approx(2.5)
    assert bump["accuracy_barrier"] == pytest.approx(0.7, rel=1e-15)


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
    assert greedy["selected_on"] == "fit" and analysis["averaging_vs_ensembling"]["split"] == "eval"
    scaling = analysis["scaling"]["results"]
    # x * 1.0 is x bit for bit: at factor 1 every subject is the unscaled model, exactly.
    at_one = [r for r in scaling if r["factor"] == 1.0]
    assert at_one and all(r["agreement"] == 1.0 for r in at_one)
    unscaled = analysis["scaling"]["unscaled_accuracy"]
    assert all(r["accuracy"] == unscaled[r["subject"]] for r in at_one)
    # Three distinct settings by default, each with the soup and the four ensembles.
    by_target = {t: {r["subject"] for r in scaling if r["apply_to"] == t}
                 for t in ("all", "first", "last")}  # fmt: skip
    ensembles_and_soup = {"average", OUTPUT, LOGIT, FEATURE_FIRST, FEATURE_AVERAGED}
    assert by_target["first"] == {"mlp-seed0"} | ensembles_and_soup
    assert by_target["last"] == {"mlp-seed1"} | ensembles_and_soup
    assert {r["apply_to"] for r in scaling} == set(by_target)
    templates = analysis["templates"]
    assert templates["layer"] == "layers.0.weight" and len(templates["units"]) == 4
    assert [s["name"] for s in templates["sets"]] == [
        "mlp-seed0", "mlp-seed1", "average", "mlp-seed1 aligned", "aligned average"]  # fmt: skip
    assert templates["pair"]["mean_cosine_after"] > templates["pair"]["mean_cosine_before"]
    assert sum(analysis["coefficients"]["layers"][0]["histogram"]) == 784 * 32
    out = tmp_path / "out"
    for kind in analysis:
        assert (out / "analysis" / f"{kind}.png").stat().st_size > 10_000
        assert json.loads((out / "analysis" / f"{kind}.json").read_text()) == analysis[kind]
    markdown = (out / "report.md").read_text()
    assert "![interpolation](analysis/interpolation.png)" in markdown and "| ECE |" in markdown
    assert "The greedy soup chose its ingredients on MNIST 0:1500 (fit)." in markdown
    assert "| fit | aligned average → NP Merge | MNIST 9000: (eval) | — | — | — |" in markdown
    for kind, data in analysis.items():
        assert_legible(FIGURES[kind](data), kind)
    # `mergecli report` redraws everything from report.json alone.
    for path in [out / "report.md", *(out / "analysis").iterdir()]:
        path.unlink()
    run_cli("report", str(out), check=True)
    assert (out / "report.md").read_text() == markdown
    assert (out / "analysis" / "templates.png").exists()


def assert_legible(fig, kind: str) -> None:
    """Every text of a figure is at least MIN_FONT points, at a width of at most MAX_WIDTH
    inches: read at its saved size, nothing is smaller than that."""
    from matplotlib.text import Text

    fig.canvas.draw()  # tick labels exist once drawn
    width, _ = fig.get_size_inches()
    assert width <= MAX_WIDTH, (kind, width)
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert len(texts) > 5, kind
    small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < MIN_FONT]
    assert not small, (kind, small)


@pytest.mark.slow
def test_barrier_between_a_model_and_itself_is_zero(tmp_path: Path, trained_pair) -> None:
    a, _ = trained_pair
    steps = "  - analyze: {method: interpolation, points: 5}\n"
    run_cli("run", str(analysis_recipe(tmp_path, a, a, steps)), check=True)
    curve = report_of(tmp_path)["analysis"]["interpolation"]["paths"]["naive"]["eval"]
    assert abs(curve["loss_barrier"]) < 1e-5 and abs(curve["loss_barrier_midpoint"]) < 1e-5
    # lerp(a, a, λ) is `a` bit for bit, so every point is the same model: exactly one accuracy
    # (the barriers above compare with a line computed in float, hence their tolerance).
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
    result = run_cli("run", str(one))  # the real process, once
    assert result.returncode == 1
    assert "interpolation needs at least 2 checkpoints to merge, the recipe has 1" in result.stderr
    steps = "  - analyze: {method: templates, layer: layers.1.weight}\n"
    result = run_cli_in_process("run", str(analysis_recipe(tmp_path, a, b, steps)))
    assert result.returncode == 1 and "cannot be shown as [28, 28] images" in result.stderr
    assert "Traceback" not in result.stderr
    no_data = analysis_recipe(tmp_path, a, b, "  - analyze: {method: scaling}\n", data="\n")
    result = run_cli_in_process("run", str(no_data))
    assert result.returncode == 2
    assert "analysis.yaml:9: steps.0.analyze: scaling needs data" in result.stderr
    unknown = analysis_recipe(tmp_path, a, b, "  - analyze: {method: interpolations}\n")
    result = run_cli_in_process("validate", str(unknown))
    assert result.returncode == 2 and "did you mean 'interpolation'" in result.stderr
    coefficients = analysis_recipe(tmp_path, a, b, "  - analyze: {method: coefficients}\n")
    result = run_cli_in_process("run", str(coefficients))
    assert result.returncode == 1 and "needs a `fit` step before it" in result.stderr
    assert not (tmp_path / "out" / "report.json").exists()
    result = run_cli_in_process("report", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "give the output dir of a finished" in result.stderr


@pytest.fixture(scope="module")
def linear_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two linear classifiers (MLP depth 1: one Linear, rows = classes) from different seeds."""
    root = tmp_path_factory.mktemp("linear")
    paths = [root / f"linear-seed{seed}.safetensors" for seed in (0, 1)]
    run_cli_side_by_side(
        *(["--log", "plain", "train", "--arch", "mlp", "--arg", "depth=1", "--data",
           "mnist:0:3000", "--eval-data", "mnist:test", "--epochs", "2", "--seed", str(seed),
           "--out", str(out)] for seed, out in enumerate(paths)),
    )  # fmt: skip
    return paths[0], paths[1]


@pytest.mark.slow
def test_a_linear_classifiers_rows_are_class_templates_and_so_is_their_average(
    tmp_path: Path, linear_pair
) -> None:
    a, b = linear_pair
    path = tmp_path / "linear.yaml"
    path.write_text(
        "version: 1\nmodel: {arch: mlp, args: {depth: 1}}\n"
        f"checkpoints:\n  - path: {a}\n  - path: {b}\n    role: reference\n"
        "data: {fit: {source: mnist, split: '0:3000'}, eval: {source: mnist, split: test}}\n"
        "steps:\n  - analyze: {method: templates}\n  - analyze: averaging_vs_ensembling\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    run_cli("run", str(path), check=True)
    analysis = report_of(tmp_path)["analysis"]
    templates = analysis["templates"]
    # Linear models: averaging the weights averages the logits, so the uniform soup is the
    # logit ensemble (and the feature ensemble through the averaged head: features = inputs).
    # Computed in another order, the logits agree to float32 rounding (~1e-6): the losses to
    # 1e-5, and an example whose two top logits are that close may change its argmax, so the
    # accuracies (of the 2,000 mnist:test examples) may differ by one example.
    rows = {r["kind"]: r for r in analysis["averaging_vs_ensembling"]["results"]}
    for kind in ("logit_ensemble", "feature_ensemble_averaged_head"):
        assert rows[kind]["loss"] == pytest.approx(rows["uniform_soup"]["loss"], abs=1e-5)
        one_example = 1 / 2000
        assert rows[kind]["accuracy"] == pytest.approx(
            rows["uniform_soup"]["accuracy"], abs=1.5 * one_example
        )
    # The recipe's reference model is drawn first; a classifier shows one row per class.
    assert templates["model"] == "linear-seed1" and templates["layer"] == "head.weight"
    assert templates["per_class"] and templates["units"] == list(range(10))
    sets = {s["name"]: s for s in templates["sets"]}
    assert list(sets) == ["linear-seed1", "linear-seed0", "average"]
    for template_set in sets.values():
        assert [m["class"] for m in template_set["match"]] == list(range(10))
    # Row k of each model and of their average looks like class k's centred mean (a linear
    # classifier's rows are class templates); averaging weights averages the templates.
    assert all(s["mean_cosine"] > 0.3 for s in sets.values()), {
        n: s["mean_cosine"] for n, s in sets.items()}  # fmt: skip
    first, second = (torch.tensor(sets[n]["images"]) for n in ("linear-seed1", "linear-seed0"))
    torch.testing.assert_close(torch.tensor(sets["average"]["images"]), (first + second) / 2,
                               atol=2e-4, rtol=0)  # fmt: skip
    # Rows are classes, matched by nature: each row is closest to the same class's row of the
    # other model.
    similarity = F.normalize(first, dim=1) @ F.normalize(second, dim=1).T
    assert similarity.argmax(1).tolist() == list(range(10))
    assert templates["pair"]["mean_cosine_before"] == pytest.approx(
        float(similarity.diag().mean()), abs=1e-3)  # fmt: skip
    assert_legible(FIGURES["templates"](templates), "templates")
