"""NP Merge of three models, as users run it: a pairwise chain whose later stages align the next
model to the running merge the way the recipe's `align` step says, on every built-in BatchNorm
architecture, and per-epoch validation that scores the model as it will be used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_cli
from mergecli.models import build_model
from mergecli.runtime.log import Log
from mergecli.train import save_trained, train_model
from mergecli.train_regime import Regime

# Tiny BatchNorm models of every built-in architecture that has BatchNorm, for 28x28 MNIST.
BATCHNORM_ARCHS = {
    "mlp": {"depth": 3, "hidden": 16, "batchnorm": True},
    "vgg": {"variant": 11, "width": 0.125, "batchnorm": True, "in_channels": 1},
    "resnet20": {"width": 0.25, "in_channels": 1},
}


def train_three(folder: Path, arch: str, args: dict, examples: int = 128) -> list[Path]:
    """Three models of ``arch`` trained one epoch from seeds 0, 1, 2 (what `mergecli train`
    runs, in this process to save the start-up of three more)."""
    paths = []
    for seed in (0, 1, 2):
        module, _ = train_model(
            arch, args, {"source": "mnist", "split": f"0:{examples}"}, None, seed=seed,
            epochs=1, batch_size=64, regime=Regime(), device=torch.device("cpu"),
            log=Log("plain"),
        )  # fmt: skip
        path = folder / f"{arch}-seed{seed}.safetensors"
        save_trained(module, path, arch, args, {"seed": seed})
        paths.append(path)
    return paths


def chain_recipe(
    folder: Path, paths: list[Path], align: str, fit: str, extra: str = "", evaluate: bool = True
) -> Path:
    """Three checkpoints (the model read from their metadata), align, fit, evaluate."""
    recipe = folder / "recipe.yaml"
    checkpoints = ", ".join(f"{{path: {p}}}" for p in paths)
    align_step = f"  - align: {align}\n" if align else ""
    evaluate_step = "  - evaluate: {baselines: []}\n" if evaluate else ""
    recipe.write_text(
        f"""\
version: 1
name: chain
checkpoints: [{checkpoints}]
data:
  fit: {{source: mnist, split: "2000:2200", batch_size: 100}}
  eval: {{source: mnist, split: "9000:9200", batch_size: 100}}
steps:
{align_step}  - fit: {fit}
{extra}{evaluate_step}output: {{dir: {folder / "out"}}}
"""
    )
    return recipe


def report(folder: Path) -> dict:
    return json.loads((folder / "out" / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(BATCHNORM_ARCHS))
def test_three_batchnorm_models_fit_and_reapply(tmp_path: Path, arch: str) -> None:
    """The running merge after stage 1 is a whole model (BatchNorm statistics included), so the
    third model can be aligned to it; re-applying the saved coefficients gives the same model;
    and the last epoch's validation scores the model that `evaluate` then scores."""
    paths = train_three(tmp_path, arch, BATCHNORM_ARCHS[arch])
    # mlp: an explicit reset over 2 batches, which validation must use too; the others: the
    # reset_bn the fit runs itself (all of data.fit).
    extra = "  - repair: {method: reset_bn, batches: 2}\n" if arch == "mlp" else ""
    recipe = chain_recipe(tmp_path, paths, "{method: weight_matching}", "{steps: 2}", extra)
    result = run_cli("--log", "plain", "run", str(recipe))
    assert result.returncode == 0, result.stderr
    assert (
        f"fit stage 2/2: aligned {arch}-seed2 to the running merge (weight_matching)"
        in result.stderr
    )
    fit = report(tmp_path)["fit"]
    assert [s["align"] for s in fit["stages"]] == [
        {"method": "weight_matching", "to": f"{arch}-seed0"},
        {"method": "weight_matching", "to": "running merge"},
    ]
    # Validation runs the merged model in eval mode with the BatchNorm statistics the reset
    # after the fit computes (same batches, same merged weights: sigmoid(logits) is the saved
    # coefficient), so it gets the same examples right (compared as counts: evaluate reports
    # accuracy in float32); the losses are float32 sums taken in another order (per batch vs.
    # over all logits), hence 1e-5.
    last = fit["stages"][-1]["history"][-1]
    evaluation = report(tmp_path)["evaluate"]
    merged, examples = evaluation["results"][-1], evaluation["examples"]
    assert merged["kind"] == "merged"
    assert round(last["val_accuracy"] * examples) == round(merged["accuracy"] * examples)
    assert abs(last["val_loss"] - merged["loss"]) <= 1e-5
    model = load_file(tmp_path / "out" / "model.safetensors")

    saved = tmp_path / "coefficients.safetensors"
    saved.write_bytes((tmp_path / "out" / "coefficients.safetensors").read_bytes())
    fit = f"{{from: {saved}}}"
    recipe = chain_recipe(tmp_path, paths, "{method: weight_matching}", fit, extra, evaluate=False)
    run_cli("run", str(recipe), check=True)
    again = load_file(tmp_path / "out" / "model.safetensors")
    assert again.keys() == model.keys()
    # The same element-wise lerps by the saved values, the same alignment and BatchNorm
    # statistics recomputed the same way on the same machine: the same bits.
    assert all(torch.equal(again[k], model[k]) for k in model)
    if arch == "mlp":  # without data.fit the running merge's statistics cannot be recomputed
        lines = recipe.read_text().splitlines(keepends=True)
        recipe.write_text("".join(x for x in lines if not x.startswith(("  fit:", "  - repair"))))
        result = run_cli("run", str(recipe))
        assert result.returncode == 1
        assert "running merge of BatchNorm models needs its statistics recomputed on data.fit" in (
            result.stderr
        )


@pytest.fixture(scope="module")
def three_mlps(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three MLPs without BatchNorm (CCA gives them linear maps, not permutations)."""
    return train_three(tmp_path_factory.mktemp("mlps"), "mlp", {"depth": 3, "hidden": 16}, 1000)


def endpoint_coefficients(path: Path) -> Path:
    """Coefficients 0 at both stages of a three-model chain: each stage takes the next model
    whole (pairwise coefficients are the running merge's weight)."""
    shapes = {
        n: p.shape for n, p in build_model("mlp", {"depth": 3, "hidden": 16}).named_parameters()
    }
    tensors = {f"stage{k}/{n}": torch.zeros(s) for n, s in shapes.items() for k in (1, 2)}
    save_file(tensors, path, {"mergecli.multi": "pairwise"})
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "align",
    [
        "{method: cca, gamma: 0.5}",
        "{method: activation_matching, statistic: cross_moment, batches: 1}",
        None,
    ],
)
def test_later_stages_align_as_the_recipe_says(
    tmp_path: Path, three_mlps: list[Path], align: str | None
) -> None:
    """With coefficients 0 the running merge after stage 1 is the second model aligned to the
    first, and the result of stage 2 the third model aligned to that running merge. Aligning the
    third model to the second's aligned checkpoint in a two-model recipe with the same align step
    must give it; CCA with another method or the default gamma would not. Without an align step
    the third model is merged as it is, at every stage."""
    coefficients = endpoint_coefficients(tmp_path / "c.safetensors")
    with_saving = align.replace("}", ", save_aligned: true}") if align else ""
    recipe = chain_recipe(tmp_path, three_mlps, with_saving, f"{{from: {coefficients}}}")
    result = run_cli("--log", "plain", "run", str(recipe))
    assert result.returncode == 0, result.stderr
    model = load_file(tmp_path / "out" / "model.safetensors")
    if align is None:
        assert "running merge" not in result.stderr
        expected = load_file(three_mlps[2])
    else:
        method = align.split(",")[0].removeprefix("{method: ")
        assert f"fit stage 2/2: aligned mlp-seed2 to the running merge ({method})" in result.stderr
        running = tmp_path / "out" / "aligned" / "mlp-seed1.safetensors"
        pair = tmp_path / "pair"
        pair.mkdir()
        chain_recipe(pair, [running, three_mlps[2]], with_saving, "{}", evaluate=False)
        text = (pair / "recipe.yaml").read_text().replace("  - fit: {}\n", "  - merge: average\n")
        (pair / "recipe.yaml").write_text(text)
        run_cli("run", str(pair / "recipe.yaml"), check=True)
        expected = load_file(pair / "out" / "aligned" / "mlp-seed2.safetensors")
    # The same statistics of the same two models give the same transforms, so the tensors are
    # equal (bit for bit on the CPU; 1e-6 leaves room for a GPU's reductions).
    assert model.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(model[name], tensor, rtol=0, atol=1e-6), name
    if align and "cca" in align:  # linear maps, not permutations, at every stage
        saved = load_file(pair / "out" / "alignment.safetensors")
        assert all(t.dim() == 3 for t in saved.values())


@pytest.mark.slow
@pytest.mark.parametrize("batchnorm", ["paper", "fold"])
def test_three_batchnorm_models_with_cca(tmp_path: Path, batchnorm: str) -> None:
    """CCA maps through BatchNorm at every stage; with `fold` the running merge is folded like
    the reference was (the same function), and the final model still scores in validation what
    `evaluate` gives it after the reset."""
    paths = train_three(tmp_path, "mlp", BATCHNORM_ARCHS["mlp"])
    align = f"{{method: cca, batchnorm: {batchnorm}}}"
    recipe = chain_recipe(tmp_path, paths, align, "{steps: 2}")
    result = run_cli("--log", "plain", "run", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "fit stage 2/2: aligned mlp-seed2 to the running merge (cca)" in result.stderr
    fit = report(tmp_path)["fit"]
    assert fit["stages"][1]["align"] == {"method": "cca", "to": "running merge"}
    last = fit["stages"][-1]["history"][-1]
    evaluation = report(tmp_path)["evaluate"]
    merged, examples = evaluation["results"][-1], evaluation["examples"]
    assert round(last["val_accuracy"] * examples) == round(merged["accuracy"] * examples)
    assert abs(last["val_loss"] - merged["loss"]) <= 1e-5
