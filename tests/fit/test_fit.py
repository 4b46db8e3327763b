"""NP Merge: the coefficient math, the fit loop (determinism, resume, NaN) and the step."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import fit_setup, run_cli, small_fit, two_models, write_recipe
from mergecli.errors import MergeCliError
from mergecli.fit.coefficients import (
    FlatParameters,
    expand,
    joint_merge,
    logit,
    pairwise_merge,
)
from mergecli.fit.loop import FitCheckpoint
from mergecli.merge.average import average
from mergecli.models import build_model


def test_coefficients_one_and_zero_give_the_endpoints_exactly() -> None:
    _, models, names = two_models()
    flat = FlatParameters.stack(models, names, torch.device("cpu"))
    ones, zeros = torch.ones(flat.thetas.shape[1]), torch.zeros(flat.thetas.shape[1])
    # Coefficient values go through lerp, whose endpoints are exact.
    assert torch.equal(torch.lerp(flat.thetas[1], flat.thetas[0], ones), flat.thetas[0])
    assert torch.equal(torch.lerp(flat.thetas[1], flat.thetas[0], zeros), flat.thetas[1])
    views = flat.views(flat.thetas[0])
    assert all(torch.equal(views[n], models[0][n]) for n in names)


def test_model_granularity_with_fixed_coefficient_is_the_weighted_average() -> None:
    _, models, names = two_models()
    flat = FlatParameters.stack(models, names, torch.device("cpu"))
    merged = pairwise_merge(flat.thetas, expand(torch.tensor([logit(0.3)]), "model", None))
    expected = average(flat.thetas, torch.tensor([0.3, 0.7]))
    torch.testing.assert_close(merged, expected)


def test_tensor_granularity_gives_one_coefficient_per_tensor() -> None:
    _, models, names = two_models()
    flat = FlatParameters.stack(models, names, torch.device("cpu"))
    values = torch.linspace(0.1, 0.9, len(names))
    merged = flat.views(
        pairwise_merge(
            flat.thetas, expand(torch.logit(values), "tensor", flat.group_index("tensor"))
        )
    )
    for value, name in zip(values, names, strict=True):
        expected = value * models[0][name] + (1 - value) * models[1][name]
        torch.testing.assert_close(merged[name], expected)


def test_joint_merge_of_identical_models_is_the_model() -> None:
    theta = torch.randn(50)
    stack = torch.stack([theta, theta, theta])
    torch.testing.assert_close(joint_merge(stack, torch.randn(3, 50)), theta)
    # Uniform logits are the plain average.
    other = torch.randn(3, 50)
    torch.testing.assert_close(joint_merge(other, torch.zeros(3, 50)), other.mean(0))


def test_fit_lowers_the_loss_and_is_deterministic() -> None:
    first, second = small_fit(), small_fit()
    assert torch.equal(first.logits, second.logits)
    assert first.steps == 2 * 10
    assert first.history[-1]["train_loss"] < first.history[0]["train_loss"]
    assert not torch.equal(first.logits, torch.zeros_like(first.logits))
    other_seed = small_fit(seed=1)
    assert not torch.equal(first.logits, other_seed.logits)


def test_resumed_fit_equals_uninterrupted(tmp_path: Path) -> None:
    uninterrupted = small_fit()
    checkpoint = FitCheckpoint(tmp_path / "fit.safetensors", "fingerprint")
    stopped = small_fit(
        checkpoint=checkpoint, should_stop=lambda step: signal.SIGTERM if step == 13 else None
    )
    assert stopped.stopped and stopped.steps == 13 and checkpoint.path.exists()
    assert stopped.stopped_by == signal.SIGTERM
    resumed = small_fit(checkpoint=checkpoint)
    assert resumed.steps == uninterrupted.steps
    assert torch.equal(resumed.logits, uninterrupted.logits)
    # A checkpoint from other inputs is refused rather than silently reused.
    with pytest.raises(MergeCliError, match="different recipe or different inputs"):
        small_fit(checkpoint=FitCheckpoint(checkpoint.path, "other"))


def test_nan_loss_stops_with_step_and_epoch_and_keeps_state(tmp_path: Path) -> None:
    calls = {"n": 0}
    _, _, _, _, loss_fn = fit_setup()

    def poisoned(outputs, index):
        calls["n"] += 1
        loss = loss_fn(outputs, index)
        return loss * float("nan") if calls["n"] == 12 else loss

    checkpoint = FitCheckpoint(tmp_path / "fit.safetensors", "x")
    with pytest.raises(MergeCliError, match=r"at step 12 \(epoch 2\); the last good state"):
        small_fit(checkpoint=checkpoint, loss=poisoned)
    saved = checkpoint.load()
    assert saved["step"] == 11 and torch.isfinite(saved["logits"]).all()


def test_steps_and_granularities_and_sgd() -> None:
    assert small_fit(steps=7, epochs=None).steps == 7
    assert small_fit(granularity="model", epochs=1).logits.shape == (1,)
    assert small_fit(optimizer="sgd", epochs=1, l2=0.1).steps == 10


# --- the step, as users run it --------------------------------------------------------------


def fit_recipe(tmp_path: Path, pair, fit: str, align: bool = True, extra: str = "") -> Path:
    recipe = write_recipe(tmp_path, *pair)
    steps = ("  - align: {method: weight_matching}\n" if align else "") + f"  - fit: {fit}\n"
    text = recipe.read_text().replace("  - merge: {method: average}\n", steps + extra)
    text = text.replace("data:\n", 'data:\n  fit: {source: mnist, split: "3000:4000"}\n')
    recipe.write_text(text)
    return recipe


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_np_merge_end_to_end_and_reapply(tmp_path: Path, trained_pair) -> None:
    recipe = fit_recipe(tmp_path, trained_pair, "{method: np_merge, epochs: 2, lr: 0.05}")
    result = run_cli("--log", "plain", "run", str(recipe), check=True)
    out = tmp_path / "out"
    rows = {r["kind"]: r for r in report(out)["evaluate"]["results"]}
    assert rows["merged"]["name"] == "merged (weight_matching + np_merge)"
    assert rows["merged"]["accuracy"] > report(out)["evaluate"]["results"][3]["accuracy"] - 0.2
    fit = report(out)["fit"]
    assert fit["examples"] == 1000 and len(fit["stages"][0]["history"]) == 2
    assert "val_accuracy" in fit["stages"][0]["history"][0]
    assert "fit epoch 2/2" in result.stderr and "fit time" in result.stdout
    coefficients = load_file(out / "coefficients.safetensors")
    merged = load_file(out / "model.safetensors")
    assert coefficients["layers.0.weight"].shape == merged["layers.0.weight"].shape
    assert ((coefficients["head.bias"] > 0) & (coefficients["head.bias"] < 1)).all()
    assert not (out / ".state").exists(), "a finished run removes its resumable state"
    # Re-applying the saved coefficients needs no data and gives the same model.
    saved = tmp_path / "coefficients.safetensors"
    saved.write_bytes((out / "coefficients.safetensors").read_bytes())
    recipe.write_text(
        recipe.read_text().replace("{method: np_merge, epochs: 2, lr: 0.05}", f"{{from: {saved}}}")
    )
    run_cli("run", str(recipe), check=True)
    again = load_file(out / "model.safetensors")
    # The fit merged with lerp by the very values it saved; re-applying runs the same
    # element-wise lerp on them (no reduction, no order to differ): the same bits.
    assert all(torch.equal(again[k], merged[k]) for k in merged)


@pytest.mark.slow
def test_coefficient_files_of_ones_and_zeros_reproduce_endpoints(
    tmp_path: Path, trained_pair
) -> None:
    a, b = trained_pair
    names = [n for n, _ in build_model("mlp", {"depth": 3, "hidden": 32}).named_parameters()]
    state_a, state_b = load_file(a), load_file(b)
    for value, expected in ((1.0, state_a), (0.0, state_b)):
        coefficients = tmp_path / f"c{value}.safetensors"
        save_file({n: torch.full_like(state_a[n], value) for n in names}, coefficients)
        recipe = fit_recipe(tmp_path, trained_pair, f"{{from: {coefficients}}}", align=False)
        run_cli("run", str(recipe), check=True)
        merged = load_file(tmp_path / "out" / "model.safetensors")
        # lerp's endpoints are exact (weight 1: end - diff * 0; weight 0: start + 0).
        assert all(torch.equal(merged[k], expected[k]) for k in expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fit",
    [
        "{loss: distill, epochs: 1, granularity: tensor}",
        "{loss: entropy, steps: 5, optimizer: sgd, lr: 0.01}",
    ],
)
def test_other_losses_run(tmp_path: Path, trained_pair, fit: str) -> None:
    recipe = fit_recipe(tmp_path, trained_pair, fit)
    run_cli("run", str(recipe), check=True)
    assert report(tmp_path / "out")["fit"]["loss"] in fit


@pytest.mark.slow
def test_three_models_joint_and_pairwise(tmp_path: Path, trained_pair) -> None:
    a, b = trained_pair
    for multi in ("joint", "pairwise"):
        recipe = fit_recipe(tmp_path, trained_pair, f"{{multi: {multi}, steps: 5}}")
        recipe.write_text(
            recipe.read_text().replace(f"  - path: {b}\n", f"  - path: {b}\n  - path: {a}\n")
        )
        run_cli("run", str(recipe), check=True)
        out = tmp_path / "out"
        with safe_open(str(out / "coefficients.safetensors"), "pt") as handle:
            keys = list(handle.keys())  # noqa: SIM118 - not a dict
        if multi == "joint":
            assert load_file(out / "coefficients.safetensors")["head.bias"].shape == (3, 10)
        else:
            assert {k.split("/")[0] for k in keys} == {"stage1", "stage2"}
        assert len(report(out)["fit"]["stages"]) == (1 if multi == "joint" else 2)


@pytest.mark.slow
def test_fit_warnings_and_errors(tmp_path: Path, trained_pair) -> None:
    recipe = fit_recipe(tmp_path, trained_pair, "{steps: 2}", align=False)
    result = run_cli("run", str(recipe), check=True)
    assert "alignment recommended" in result.stderr
    recipe = fit_recipe(tmp_path, trained_pair, "{lr: -0.01}")
    result = run_cli("run", str(recipe))
    assert result.returncode == 2
    assert ":14: steps.1.fit.lr: input should be greater than 0 (got -0.01)" in result.stderr
    recipe = fit_recipe(tmp_path, trained_pair, "{epochs: 2, steps: 3}")
    result = run_cli("run", str(recipe))
    assert "steps.1.fit: give epochs or steps, not both" in result.stderr


@pytest.mark.slow
def test_batchnorm_models_get_their_statistics_reset(tmp_path: Path) -> None:
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"bn{seed}.safetensors")
        run_cli(
            "train", "--arg", "depth=3", "--arg", "hidden=16", "--arg", "batchnorm=true",
            "--data", "mnist:0:1000", "--epochs", "1", "--seed", str(seed), "--out", str(paths[-1]),
            check=True,
        )  # fmt: skip
    recipe = tmp_path / "bn.yaml"
    recipe.write_text(
        f"version: 1\ncheckpoints: [{{path: {paths[0]}}}, {{path: {paths[1]}}}]\n"
        'data: {fit: {source: mnist, split: "2000:2500"}}\n'
        "steps: [{align: {}}, {fit: {steps: 4}}]\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    result = run_cli("--log", "plain", "run", str(recipe), check=True)
    assert "no repair step follows: running reset_bn" in result.stderr
    assert report(tmp_path / "out")["repair"]["method"] == "reset_bn"


@pytest.mark.slow
def test_compiled_fit_runs(tmp_path: Path, trained_pair) -> None:
    recipe = fit_recipe(tmp_path, trained_pair, "{steps: 3, compile: true}")
    run_cli("run", str(recipe), check=True)
    assert report(tmp_path / "out")["fit"]["stages"][0]["steps"] == 3


@pytest.mark.slow
def test_two_fit_steps_in_one_recipe_each_keep_their_own_state(
    tmp_path: Path, trained_pair
) -> None:
    """Each fit knows its place: the second is not taken for the first, on a run or a resume."""
    fit = "{method: np_merge, steps: 4, lr: 0.05, checkpoint_every: 2}"
    recipe = fit_recipe(tmp_path, trained_pair, fit, extra=f"  - fit: {fit}\n")
    result = run_cli("--log", "plain", "run", str(recipe), check=True)
    assert "already finished" not in result.stderr
    assert result.stderr.count("step 1: fit (np_merge)") == 1
    assert result.stderr.count("step 2: fit (np_merge)") == 1
    rows = {r["kind"]: r for r in report(tmp_path / "out")["evaluate"]["results"]}
    assert rows["merged"]["name"] == "merged (weight_matching + np_merge + np_merge)"
