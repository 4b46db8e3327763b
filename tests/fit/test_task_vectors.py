"""The fit over task vectors: its start merges as coefficients, granularity `row`, the stack in
another dtype, activation checkpointing, and the step as users run it with `role: base`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import cli_env, fit_config, run_cli, two_models
from mergecli.fit.coefficients import (
    FlatParameters,
    expand,
    joint_merge,
    logits_per_model,
    merged_weights,
    pairwise_merge,
    task_vector_merge,
)
from mergecli.fit.loop import CoefficientStep
from mergecli.fit.start import TaskVectors, apply_task_vectors, start_merge
from mergecli.fit.step import FitParams, _coefficients_by_name
from mergecli.merge.task_arithmetic import task_arithmetic, ties, ties_coefficients
from mergecli.models import build_model


def triple(paths) -> tuple[dict, list[dict], list[str]]:
    base, *tuned = (load_file(p) for p in paths)
    names = [n for n, _ in build_model("mlp", {"depth": 3, "hidden": 32}).named_parameters()]
    return base, tuned, names


# --- the start merges as coefficients -------------------------------------------------------


@pytest.mark.parametrize(
    ("density", "weights", "normalize"),
    [
        (0.3, [1.0, 1.0], True),
        (0.5, [0.7, 0.4], True),
        (0.2, [1.0, 0.5], False),
        (1.0, [1, 1], True),
    ],
)
def test_ties_as_coefficients_is_ties(finetuned_triple, density, weights, normalize) -> None:
    base, tuned, names = triple(finetuned_triple)
    w = torch.tensor(weights)
    for name in names:
        stack = torch.stack([t[name] for t in tuned])
        expected = ties(stack.clone(), w, base[name], density, 0.8, normalize)
        c = ties_coefficients(stack.clone(), w, base[name], density, 0.8, normalize)
        got = base[name] + (c * (stack - base[name])).sum(0)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        # Trimmed or disagreeing entries weigh nothing; with density < 1 some are trimmed.
        if density < 1 and name.endswith("weight"):
            assert (c == 0).any()


@pytest.mark.parametrize(
    ("method", "params"),
    [("task_arithmetic", {"lambda": 0.6}), ("ties", {"density": 0.3, "lambda": 1.2}),
     ("average", {}), ("task_arithmetic", {"lambda": [0.2, 0.9], "normalize": True})],
)  # fmt: skip
def test_every_start_as_coefficients_is_the_merge(finetuned_triple, method, params) -> None:
    base, tuned, names = triple(finetuned_triple)
    start = start_merge(method, params, base, tuned, torch.tensor([1.0, 0.5]), names)
    again = apply_task_vectors(base, tuned, start.coefficients, names)
    for name in names:
        torch.testing.assert_close(again[name], start.merged[name], rtol=0, atol=1e-6)
    if method == "average":  # against the plain weighted average of the fine-tunes
        expected = (tuned[0]["head.weight"] + 0.5 * tuned[1]["head.weight"]) / 1.5
        torch.testing.assert_close(start.merged["head.weight"], expected, rtol=0, atol=1e-6)


def test_coefficients_zero_give_the_base_and_one_task_arithmetic(finetuned_triple) -> None:
    base, tuned, names = triple(finetuned_triple)
    zeros = {n: torch.zeros(2) for n in names}
    merged = apply_task_vectors(base, tuned, zeros, names)
    assert all(torch.equal(merged[n], base[n]) for n in names)
    ones = apply_task_vectors(base, tuned, {n: torch.ones(2) for n in names}, names)
    for name in names:
        stack = torch.stack([t[name] for t in tuned])
        expected = task_arithmetic(stack, torch.ones(2), base[name], lam=1.0)
        torch.testing.assert_close(ones[name], expected, rtol=0, atol=1e-6)
        # and the formula itself, independently: base + sum_i (theta_i - base)
        by_hand = tuned[0][name] + tuned[1][name] - base[name]
        torch.testing.assert_close(ones[name], by_hand, rtol=0, atol=1e-6)


def test_the_fit_starts_exactly_at_the_start_merge(finetuned_triple) -> None:
    base, tuned, names = triple(finetuned_triple)
    start = start_merge("ties", {"density": 0.3}, base, tuned, torch.ones(2), names)
    flat = FlatParameters.stack(
        [start.merged, *(TaskVectors(t, base) for t in tuned)], names, torch.device("cpu")
    )
    for granularity in ("parameter", "row", "tensor", "model"):
        deltas = torch.zeros(2, logits_per_model(granularity, flat))
        merged = flat.views(
            task_vector_merge(
                flat.thetas, expand(deltas, granularity, flat.group_index(granularity))
            )
        )
        assert all(torch.equal(merged[n], start.merged[n]) for n in names), granularity
    # delta moves the merge along the task vectors: c0 + delta, by the formula
    deltas = torch.full((2, 1), 0.25)
    merged = flat.views(task_vector_merge(flat.thetas, deltas))
    expected = apply_task_vectors(
        base, tuned, {n: start.coefficients[n] + 0.25 for n in names}, names
    )
    for name in names:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-6)


def test_merging_tensor_by_tensor_is_the_fused_merge_and_gradient(finetuned_triple) -> None:
    base, tuned, names = triple(finetuned_triple)
    start = start_merge("ties", {"density": 0.3}, base, tuned, torch.ones(2), names)
    flat = FlatParameters.stack(
        [start.merged, *(TaskVectors(t, base) for t in tuned)], names, torch.device("cpu")
    )
    for granularity in ("row", "tensor", "model"):
        groups = flat.group_index(granularity)
        deltas = torch.randn(2, logits_per_model(granularity, flat), requires_grad=True)
        fused = flat.views(task_vector_merge(flat.thetas, expand(deltas, granularity, groups)))
        by_tensor = merged_weights(flat, task_vector_merge, deltas, granularity, groups)
        weights = {n: torch.randn_like(t) for n, t in fused.items()}
        grads = [
            torch.autograd.grad(sum((m[n] * weights[n]).sum() for n in names), deltas)[0]
            for m in (fused, by_tensor)
        ]
        for name in names:
            torch.testing.assert_close(by_tensor[name], fused[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-4)


# --- granularity row --------------------------------------------------------------------------


def test_row_granularity_is_one_coefficient_per_output_unit() -> None:
    _, models, names = two_models()
    flat = FlatParameters.stack(models, names, torch.device("cpu"))
    shapes = {n: models[0][n].shape for n in names}
    assert flat.rows == [shapes[n][0] for n in names]
    assert logits_per_model("row", flat) == sum(shapes[n][0] for n in names)
    values = torch.rand(logits_per_model("row", flat))
    merged = flat.views(
        pairwise_merge(flat.thetas, expand(values.logit(), "row", flat.group_index("row")))
    )
    rows = dict(zip(names, values.split(flat.rows), strict=True))
    for name in names:  # each row its own weight, by the formula
        c = rows[name].reshape(-1, *([1] * (len(shapes[name]) - 1)))
        expected = c * models[0][name] + (1 - c) * models[1][name]
        torch.testing.assert_close(merged[name], expected)
    params = FitParams(granularity="row", multi="joint")
    saved = _coefficients_by_name(flat, torch.stack([values, 1 - values]), params, "")
    assert {n: tuple(t.shape) for n, t in saved.items()} == {n: (2, shapes[n][0]) for n in names}
    pairwise = _coefficients_by_name(flat, values, FitParams(granularity="row"), "")
    assert {n: tuple(t.shape) for n, t in pairwise.items()} == {n: (shapes[n][0],) for n in names}


def test_expanding_groups_matches_an_index_and_its_gradient() -> None:
    _, models, names = two_models()
    flat = FlatParameters.stack(models, names, torch.device("cpu"))
    for granularity in ("row", "tensor"):
        groups = flat.group_index(granularity)
        logits = torch.randn(2, sum(groups.counts), requires_grad=True)
        # the independent formula: a scalar-to-group index, as torch would gather it
        index = torch.repeat_interleave(
            torch.arange(sum(groups.counts)),
            torch.tensor(
                [n for c, n in zip(groups.counts, groups.lengths, strict=True) for _ in range(c)]
            ),
        )
        assert torch.equal(expand(logits, granularity, groups), logits[:, index])
        weights = torch.randn(2, flat.thetas.shape[1])
        (expand(logits, granularity, groups) * weights).sum().backward()
        expected = torch.zeros(2, sum(groups.counts)).index_add_(1, index, weights)
        torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-5)


def test_a_bf16_stack_merges_in_float32() -> None:
    _, models, names = two_models()
    flat = FlatParameters.stack(models, names, torch.device("cpu"), torch.bfloat16)
    assert flat.thetas.dtype == torch.bfloat16
    rounded = FlatParameters.stack(
        [{n: t.bfloat16().float() for n, t in m.items()} for m in models],
        names,
        torch.device("cpu"),
    )
    logits = torch.randn(flat.thetas.shape[1])
    got = pairwise_merge(flat.thetas, logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, pairwise_merge(rounded.thetas, logits), rtol=1e-6, atol=1e-7)
    joint = joint_merge(flat.thetas, torch.randn(2, flat.thetas.shape[1]))
    assert joint.dtype == torch.float32


# --- activation checkpointing -------------------------------------------------------------------


def gradients(module, flat, x, loss_fn, granularity: str, checkpointing: bool) -> torch.Tensor:
    config = fit_config(granularity=granularity, checkpointing=checkpointing)
    initial = 0.1 * torch.randn(
        2, logits_per_model(granularity, flat), generator=torch.Generator().manual_seed(0)
    )
    step = CoefficientStep(
        module, flat, {}, task_vector_merge, initial, loss_fn, config, torch.device("cpu")
    )
    with step.session():
        step.loss(x, torch.arange(len(x))).backward()
    return step.logits.grad


def test_checkpointing_gives_the_same_gradients_on_an_mlp() -> None:
    module, models, names = two_models()
    flat = FlatParameters.stack([models[0], *models], names, torch.device("cpu"))
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))

    def loss_fn(outputs, index):
        return F.cross_entropy(outputs, y[index])

    for granularity in ("parameter", "row"):
        plain = gradients(module, flat, x, loss_fn, granularity, False)
        checkpointed = gradients(
            build_model("mlp", {"depth": 3, "hidden": 16}), flat, x, loss_fn, granularity, True
        )
        assert plain.abs().sum() > 0
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wrapped", [False, True])
def test_checkpointing_a_hugging_face_llama_gives_the_same_gradients(wrapped: bool) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip

    class Logits(torch.nn.Module):  # a model of the user's own around a transformers one
        def __init__(self, seed: int) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.lm = transformers.LlamaForCausalLM(config).eval()

        def forward(self, ids):
            return self.lm(ids).logits

    def llama(seed: int):
        if wrapped:
            return Logits(seed)
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(config).eval()

    module = llama(0)
    names = [n for n, _ in module.named_parameters()]
    states = [llama(seed).state_dict() for seed in (1, 2, 3)]
    flat = FlatParameters.stack(states, names, torch.device("cpu"))
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))

    def next_token(outputs, index):
        return F.cross_entropy(outputs[:, :-1].reshape(-1, 64), ids[index][:, 1:].reshape(-1))

    plain = gradients(module, flat, ids, next_token, "row", False)
    checkpointed_module = llama(0)
    checkpointed = gradients(checkpointed_module, flat, ids, next_token, "row", True)
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-5)
    inner = checkpointed_module.lm if wrapped else checkpointed_module
    layers = inner.model.layers
    assert all(layer.gradient_checkpointing and layer.training for layer in layers)
    assert not any(m.training for m in layers[0].modules() if m is not layers[0])


# --- the step, as users run it ------------------------------------------------------------------


def task_vector_recipe(
    tmp_path: Path, paths, fit: str, name: str = "recipe.yaml", extra: str = ""
) -> Path:
    base, a, b = paths
    recipe = tmp_path / name
    recipe.write_text(
        f"""\
version: 1
name: task-vectors
model: {{arch: mlp, args: {{depth: 3, hidden: 32}}}}
checkpoints:
  - {{path: {base}, role: base}}
  - {{path: {a}}}
  - {{path: {b}}}
data:
  fit: {{source: mnist, split: "3000:3600", batch_size: 100}}
steps:
  - fit: {fit}
{extra}output: {{dir: {tmp_path / "out"}}}
"""
    )
    return recipe


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_ties_start_fit_beats_ties_and_reapplies_bit_identical(tmp_path, finetuned_triple) -> None:
    fit = "{start: ties, start_params: {density: 0.3}, granularity: row, steps: 30, lr: 0.02}"
    analyze = "  - analyze: {method: coefficients}\n"
    recipe = task_vector_recipe(tmp_path, finetuned_triple, fit, extra=analyze)
    result = run_cli("--log", "plain", "run", str(recipe), check=True)
    out = tmp_path / "out"
    shown = report(out)["analysis"]["coefficients"]
    assert shown["multi"] == "task_vectors" and len(shown["layers"]) == 6 * 2
    first = shown["layers"][0]
    assert first["tensor"] == "layers.0.weight [ft1]" and sum(first["histogram"]) == 32 * 784
    fitted = report(out)["fit"]
    assert fitted["start"] == {"method": "ties", "params": {"density": 0.3}}
    assert fitted["kept"] == "fit" and fitted["fit_loss"]["end"] < fitted["fit_loss"]["start"]
    assert "at the start (ties)" in result.stderr
    # The start loss is the loss of the ties merge itself, by the merge step.
    merge = (
        task_vector_recipe(tmp_path, finetuned_triple, "x", "merge.yaml")
        .read_text()
        .replace("  - fit: x\n", "  - merge: {method: ties, density: 0.3}\n")
    )
    (tmp_path / "merge.yaml").write_text(merge.replace(str(out), str(tmp_path / "ties")))
    run_cli("run", str(tmp_path / "merge.yaml"), check=True)
    merged_ties = load_file(tmp_path / "ties" / "model.safetensors")
    data = __import__("mergecli.data", fromlist=["load_data"]).load_data(
        {"source": "mnist", "split": "3000:3600"}
    )
    module = build_model("mlp", {"depth": 3, "hidden": 32}).eval()
    module.load_state_dict(merged_ties)
    with torch.no_grad():
        ties_loss = float(F.cross_entropy(module(data.x), data.y))
    assert abs(ties_loss - fitted["fit_loss"]["start"]) < 1e-5
    model = load_file(out / "model.safetensors")
    module.load_state_dict(model)
    with torch.no_grad():
        assert (
            abs(float(F.cross_entropy(module(data.x), data.y)) - fitted["fit_loss"]["end"]) < 1e-5
        )
    # Row coefficients over TIES's per-entry start: one weight per model and entry.
    coefficients = load_file(out / "coefficients.safetensors")
    assert coefficients["layers.0.weight"].shape == (2, 32, 784)
    with safe_open(str(out / "coefficients.safetensors"), framework="pt") as f:
        assert f.metadata()["mergecli.multi"] == "task_vectors"
    saved = tmp_path / "saved.safetensors"
    saved.write_bytes((out / "coefficients.safetensors").read_bytes())
    recipe.write_text(recipe.read_text().replace(fit, f"{{from: {saved}}}").replace(analyze, ""))
    run_cli("run", str(recipe), check=True)
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(again[k], model[k]) for k in model)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fit",
    [
        "{start: task_arithmetic, start_params: {lambda: 0.5}, granularity: tensor, steps: 3}",
        "{start: average, granularity: model, steps: 3}",
        "{granularity: parameter, steps: 3}",
    ],
)
def test_every_start_ends_no_worse(tmp_path, finetuned_triple, fit: str) -> None:
    run_cli("run", str(task_vector_recipe(tmp_path, finetuned_triple, fit)), check=True)
    fitted = report(tmp_path / "out")["fit"]
    assert fitted["start"]["method"] in (fit + " task_arithmetic")
    losses = fitted["fit_loss"]
    assert losses["end"] <= losses["start"] or fitted["kept"] == "start"


@pytest.mark.slow
def test_a_fit_that_makes_it_worse_keeps_the_start(tmp_path, finetuned_triple) -> None:
    # Adam at lr 30 throws the coefficients far from anything useful in two steps.
    fit = "{start: ties, start_params: {density: 0.3}, granularity: model, steps: 2, lr: 30}"
    result = run_cli(
        "--log", "plain", "run", str(task_vector_recipe(tmp_path, finetuned_triple, fit))
    )
    assert result.returncode == 0, result.stderr
    fitted = report(tmp_path / "out")["fit"]
    assert fitted["kept"] == "start" and fitted["fit_loss"]["end"] > fitted["fit_loss"]["start"]
    assert "keeping the start (ties)" in result.stderr
    base, tuned, names = triple(finetuned_triple)
    model = load_file(tmp_path / "out" / "model.safetensors")
    for name in names:
        stack = torch.stack([t[name] for t in tuned])
        expected = ties(stack, torch.ones(2), base[name], 0.3, 1.0, True)
        torch.testing.assert_close(model[name], expected, rtol=0, atol=1e-6)


def test_start_without_a_base_is_one_line(tmp_path, finetuned_triple) -> None:
    recipe = task_vector_recipe(tmp_path, finetuned_triple, "{start: ties, steps: 3}")
    recipe.write_text(recipe.read_text().replace(", role: base}", "}"))
    result = run_cli("run", str(recipe))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"{recipe}:11: steps.0.fit.start: start needs a base model: mark one checkpoint "
        "`role: base` (without one, np_merge merges the models themselves)"
    )
    for fit, message in (
        ("{start: ties, start_params: {density: 2}}", "density: Input should be less than or "
                                                      "equal to 1"),
        ("{start_params: {density: 0.5}}", "density: not a parameter of task_arithmetic, the "
                                           "start merge (its parameters: lambda, normalize)"),
    ):  # fmt: skip
        result = run_cli("run", str(task_vector_recipe(tmp_path, finetuned_triple, fit)))
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert f"{recipe}:11: steps.0.fit.start_params.{message}" in result.stderr


def test_the_readme_quotes_the_memory_scripts_table() -> None:
    root = Path(__file__).parents[2]
    printed = subprocess.run(
        [sys.executable, str(root / "scripts" / "fit_memory.py")],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    readme = (root / "README.md").read_text()
    quoted = readme.split("<!-- fit_memory -->\n")[1].split("<!-- /fit_memory -->")[0]
    rows = quoted.strip().splitlines()
    assert len(rows) >= 9 and all(row in printed for row in rows)


@pytest.mark.slow
def test_a_llama_base_and_fine_tunes_fit_from_ties_with_checkpointing(tmp_path) -> None:
    """`arch: hf` with a base: coefficients per row over two fine-tunes' task vectors, on
    next-token prediction, with activation checkpointing (tied embeddings, bf16 files)."""
    from fixtures.hf_models import llama_family, lm_tokens_file

    transformers = pytest.importorskip("transformers")
    folders = llama_family(tmp_path, dtype=torch.bfloat16)
    data = lm_tokens_file(tmp_path / "tokens.safetensors")
    recipe = tmp_path / "llama.yaml"
    recipe.write_text(
        f"""\
version: 1
model: {{arch: hf}}
checkpoints: [{{path: {folders[0]}, role: base}}, {{path: {folders[1]}}}, {{path: {folders[2]}}}]
data:
  fit: {{source: tensors, path: {data}, batch_size: 32}}
steps:
  - fit: {{loss: causal_lm, start: ties, start_params: {{density: 0.5}}, granularity: row,
           checkpointing: true, steps: 6, lr: 0.02}}
output: {{dir: {tmp_path / "out"}}}
"""
    )
    result = run_cli("--log", "plain", "run", str(recipe), env=cli_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    fitted = report(tmp_path / "out")["fit"]
    assert fitted["start"]["method"] == "ties" and fitted["granularity"] == "row"
    assert fitted["kept"] == "fit" and fitted["fit_loss"]["end"] < fitted["fit_loss"]["start"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    assert torch.isfinite(merged(load_file(data)["x"][:2]).logits).all()
