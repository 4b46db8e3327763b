"""ZipIt! as users run it: `align: {method: zipit}` then `merge: average` on trained MLPs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import error_line, mlp_checkpoint, run_cli, write_recipe
from mergecli.align.zipit import correlation_from_covariance, zip_features
from mergecli.data.sources import load_data

pytestmark = pytest.mark.slow
FIT = {"source": "mnist", "split": "3000:4000"}


def zipit_recipe(tmp_path: Path, a: Path, b: Path, align: str = "{method: zipit}") -> Path:
    recipe = write_recipe(tmp_path, a, b)
    text = recipe.read_text().replace("steps:\n", f"steps:\n  - align: {align}\n")
    text = text.replace("[endpoints, ensemble, average]", "[endpoints, average, aligned_average]")
    text = text.replace("data:\n", f'data:\n  fit: {{source: mnist, split: "{FIT["split"]}"}}\n')
    recipe.write_text(text)
    return recipe


def hidden_units(weights: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """The post-ReLU units of the 3-layer MLP's two hidden layers, in float64."""
    h1 = torch.relu(x @ weights["layers.0.weight"].double().T + weights["layers.0.bias"].double())
    h2 = torch.relu(h1 @ weights["layers.1.weight"].double().T + weights["layers.1.bias"].double())
    return [h1, h2]


def test_zipped_layers_are_the_papers_merge_of_the_two_models(tmp_path: Path, trained_pair) -> None:
    recipe = zipit_recipe(tmp_path, *trained_pair, "{method: zipit, alpha: 0.5, beta: 0.5}")
    # ZipIt! as an evaluate baseline too: the same zip of the checkpoints as loaded.
    text = recipe.read_text().replace(
        "aligned_average]", "aligned_average, {zipit: {alpha: 0.5, beta: 0.5}}]"
    )
    recipe.write_text(text)
    run_cli("run", str(recipe), check=True)
    out = tmp_path / "out"
    merged = load_file(out / "model.safetensors")

    # By hand: correlations of both models' hidden units on data.fit, ZipIt!'s matching, then
    # W* = M_a W_a U_a + M_b W_b U_b per layer (U of the layer's input, M of its output).
    a, b = (load_file(p) for p in trained_pair)
    data = load_data(FIT)
    x = torch.cat([xb for xb, _ in data.batches(1000)]).flatten(1).double()
    zips = []
    for units_a, units_b in zip(hidden_units(a, x), hidden_units(b, x), strict=True):
        both = torch.cat([units_a, units_b], 1)
        covariance = torch.cov(both.T, correction=0)
        zips.append(zip_features(correlation_from_covariance(covariance), 2, 0.5, 0.5))
    n = 32
    m = [[z.merge[:, :n], z.merge[:, n:]] for z in zips]
    u = [[z.unmerge[:n], z.unmerge[n:]] for z in zips]
    expected = {
        "layers.0.weight": m[0][0] @ a["layers.0.weight"].double()
        + m[0][1] @ b["layers.0.weight"].double(),
        "layers.0.bias": m[0][0] @ a["layers.0.bias"].double()
        + m[0][1] @ b["layers.0.bias"].double(),
        "layers.1.weight": m[1][0] @ a["layers.1.weight"].double() @ u[0][0]
        + m[1][1] @ b["layers.1.weight"].double() @ u[0][1],
        "layers.1.bias": m[1][0] @ a["layers.1.bias"].double()
        + m[1][1] @ b["layers.1.bias"].double(),
        "head.weight": (a["head.weight"].double() @ u[1][0] + b["head.weight"].double() @ u[1][1])
        / 2,
        "head.bias": (a["head.bias"].double() + b["head.bias"].double()) / 2,
    }
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name].double(), tensor, atol=1e-5, rtol=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert report["align"]["method"] == "zipit"
    within = report["align"]["zipit"]["within_model_merges"]
    assert set(within) == {"layers.0", "layers.1"}
    assert sum(z.within_merges[0] for z in zips) == sum(w["mlp-seed0"] for w in within.values())
    rows = {row["name"]: row for row in report["evaluate"]["results"]}
    merged_row = next(r for r in rows.values() if r["kind"] == "merged")
    assert merged_row["accuracy"] == rows["aligned average"]["accuracy"]
    assert rows["zipit (alpha=0.5, beta=0.5)"]["loss"] == pytest.approx(merged_row["loss"], 1e-6)
    assert merged_row["accuracy"] > rows["average"]["accuracy"]


def test_zipping_a_model_with_its_permuted_copy_returns_the_model(tmp_path: Path) -> None:
    # Every unit is live on data.fit (biases raised): each correlates 1 with its copy only, so
    # ZipIt! pairs them. (A dead unit correlates with nothing, and the greedy merge would then
    # pair two live features instead, as the paper's algorithm does: no longer the model.)
    a = load_file(mlp_checkpoint(tmp_path / "init.safetensors", 3, depth=3, hidden=32))
    a["layers.0.bias"] += 1.0
    a["layers.1.bias"] += 1.0
    source = tmp_path / "a.safetensors"
    save_file(a, source)
    x = torch.cat([xb for xb, _ in load_data(FIT).batches(1000)]).flatten(1).double()
    assert all(bool((h.amax(0) > 0).all()) for h in hidden_units(a, x))
    p, q = torch.randperm(32, generator=torch.Generator().manual_seed(0)), torch.randperm(32)
    copy = {
        "layers.0.weight": a["layers.0.weight"][p],
        "layers.0.bias": a["layers.0.bias"][p],
        "layers.1.weight": a["layers.1.weight"][q][:, p],
        "layers.1.bias": a["layers.1.bias"][q],
        "head.weight": a["head.weight"][:, q],
        "head.bias": a["head.bias"],
    }
    permuted = tmp_path / "permuted.safetensors"
    save_file(copy, permuted)
    run_cli("run", str(zipit_recipe(tmp_path, source, permuted)), check=True)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in a.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=1e-5)


def logits(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return hidden_units(weights, x)[1] @ weights["head.weight"].double().T + weights["head.bias"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("steps:\n", "steps:\n  - align: {method: zipit}\n"), "data.fit"),
        (("[endpoints, ensemble, average]", "[endpoints, zipit]"), "zipit needs data.fit"),
        (("[endpoints, ensemble, average]", "[{zipit: {from: a.safetensors}}]"), "from is for"),
        (("[endpoints, ensemble, average]", "[{zipit: {alpha: x}}]"), "zipit: alpha"),
        (("[endpoints, ensemble, average]", "[aligned_zipit]"), "name it `zipit`"),
        (
            (
                "steps:\n",
                "  fit: {source: text, path: t.txt}\nsteps:\n"
                "  - align: {method: zipit, beta: [0, 1]}\n",
            ),
            "beta: a list is searched by the zips' accuracy on data.fit, which needs a classifier",
        ),
    ],
)
def test_zipit_recipe_mistakes_are_one_line_at_validate(
    tmp_path: Path, trained_pair, change: tuple[str, str], message: str
) -> None:
    recipe = write_recipe(tmp_path, *trained_pair)
    recipe.write_text(recipe.read_text().replace(*change))
    result = run_cli("validate", str(recipe))
    assert result.returncode == 2
    assert message in error_line(result)


def test_partial_zip_gives_each_model_the_zipped_layers_and_its_own_head(
    tmp_path: Path, trained_pair
) -> None:
    align = "{method: zipit, partial: layers.0, save_aligned: true}"
    recipe = zipit_recipe(tmp_path, *trained_pair, align)
    text = recipe.read_text().replace("aligned_average]", "aligned_average, aligned_ensemble]")
    recipe.write_text(text)
    run_cli("run", str(recipe), check=True)
    out = tmp_path / "out"
    a, b = (load_file(p) for p in trained_pair)
    x = torch.cat([xb for xb, _ in load_data(FIT).batches(1000)]).flatten(1).double()
    both = torch.cat([hidden_units(a, x)[0], hidden_units(b, x)[0]], 1)
    zipped = zip_features(
        correlation_from_covariance(torch.cov(both.T, correction=0)), 2, 0.3, 0.125
    )
    n = 32
    m, u = (zipped.merge[:, :n], zipped.merge[:, n:]), (zipped.unmerge[:n], zipped.unmerge[n:])
    w0 = m[0] @ a["layers.0.weight"].double() + m[1] @ b["layers.0.weight"].double()
    b0 = m[0] @ a["layers.0.bias"].double() + m[1] @ b["layers.0.bias"].double()
    shared = torch.relu(x @ w0.T + b0)  # the zipped first layer's units
    for own, unmerge, path in zip((a, b), u, trained_pair, strict=True):
        # The paper's head of this model: its own later layers, reading the zipped units
        # through its unmerge U_m.
        h2 = torch.relu(
            shared @ (own["layers.1.weight"].double() @ unmerge).T + own["layers.1.bias"].double()
        )
        expected = h2 @ own["head.weight"].double().T + own["head.bias"].double()
        aligned = load_file(out / "aligned" / f"{path.stem}.safetensors")
        torch.testing.assert_close(aligned["layers.0.weight"].double(), w0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits(aligned, x), expected, atol=1e-4, rtol=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert report["align"]["zipit"]["zipped"] == ["layers.0"]
    rows = {row["name"]: row for row in report["evaluate"]["results"]}
    assert rows["aligned ensemble"]["kind"] == "aligned_ensemble"
    # The merged model: zipped first layer, the permutation-aligned average after it.
    merged = load_file(out / "model.safetensors")
    torch.testing.assert_close(merged["layers.0.weight"].double(), w0, atol=1e-5, rtol=1e-5)
    # The aligned ensemble is the multi-head model: the mean of the heads' softmax on data.eval.
    test = load_data({"source": "mnist", "split": "9000:"})
    x_test = torch.cat([xb for xb, _ in test.batches(1000)]).flatten(1).double()
    heads = [
        logits(load_file(out / "aligned" / f"{p.stem}.safetensors"), x_test) for p in trained_pair
    ]
    probabilities = sum(h.softmax(1) for h in heads) / 2
    by_hand = float((probabilities.argmax(1) == test.y).double().mean())
    assert abs(rows["aligned ensemble"]["accuracy"] - by_hand) <= 1 / len(test.y)


def test_partial_zip_names_a_group_of_the_model(tmp_path: Path, trained_pair) -> None:
    recipe = zipit_recipe(tmp_path, *trained_pair, "{method: zipit, partial: layer.9}")
    result = run_cli("run", str(recipe))
    assert result.returncode == 2
    line = error_line(result)
    assert "layer.9" in line and "layers.0, layers.1" in line
    assert not (tmp_path / "out").exists()


def test_lists_of_alpha_and_beta_are_searched_on_data_fit(tmp_path: Path, trained_pair) -> None:
    search = "{method: zipit, alpha: [0.3, 1.0], beta: [0.0, 1.0]}"
    (tmp_path / "search").mkdir()
    run_cli("run", str(zipit_recipe(tmp_path / "search", *trained_pair, search)), check=True)
    report = json.loads((tmp_path / "search" / "out" / "report.json").read_text())
    zipit = report["align"]["zipit"]
    rows = zipit["search"]
    assert [(r["alpha"], r["beta"]) for r in rows] == [
        (0.3, 0.0),
        (0.3, 1.0),
        (1.0, 0.0),
        (1.0, 1.0),
    ]
    best = max(rows, key=lambda r: (r["accuracy"], -r["loss"]))
    assert [r for r in rows if r.get("chosen")] == [best]
    assert (zipit["alpha"], zipit["beta"]) == (best["alpha"], best["beta"])
    # The chosen pair, given alone, zips the same model.
    chosen = f"{{method: zipit, alpha: {best['alpha']}, beta: {best['beta']}}}"
    (tmp_path / "one").mkdir()
    run_cli("run", str(zipit_recipe(tmp_path / "one", *trained_pair, chosen)), check=True)
    searched = load_file(tmp_path / "search" / "out" / "model.safetensors")
    single = load_file(tmp_path / "one" / "out" / "model.safetensors")
    for name, tensor in single.items():
        torch.testing.assert_close(searched[name], tensor, rtol=0, atol=0)
