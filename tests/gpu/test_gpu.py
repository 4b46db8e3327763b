"""On a CUDA GPU: the device paths give the CPU's answers (skipped where there is no GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.align_models import MODELS
from helpers import permuted_copy, run_cli, write_recipe
from mergecli.align.activations import pair_statistics
from mergecli.align.permute import apply_permutations, random_permutations
from mergecli.align.spec import derive_spec
from mergecli.align.tracing import trace
from mergecli.align.weight_matching import weight_matching
from mergecli.fit.coefficients import FlatParameters, logits_per_model, pairwise_merge
from mergecli.fit.loop import CoefficientStep, FitConfig
from mergecli.models import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_weight_matching_on_the_gpu_recovers_a_permutation_like_the_cpu() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", {"width": 2})
    spec = derive_spec(model, torch.randn(2, 3, 32, 32))
    original = model.state_dict()
    shuffled = apply_permutations(
        original, spec, random_permutations(spec, torch.Generator().manual_seed(1))
    )
    on_gpu = weight_matching(spec, original, shuffled, device="cuda")
    on_cpu = weight_matching(spec, original, shuffled, device="cpu")
    assert all(torch.equal(on_gpu[n], on_cpu[n]) for n in on_cpu)
    recovered = apply_permutations(shuffled, spec, on_gpu)
    assert all(torch.equal(recovered[n], original[n]) for n in original)


@pytest.mark.parametrize(
    "name", ["tutorial-cnn", "groupnorm-resnet", "gated-chunks", "torch-transformer"]
)
def test_flattened_and_cut_groups_on_the_gpu_match_the_cpu(name: str, device: str = "cuda") -> None:
    # Runs of positions (flatten), GroupNorm groups and chunks (activation offsets), attention.
    model, x, spec, state, shuffled = permuted_copy(*MODELS[name][:2], samples=64)
    on_gpu = weight_matching(spec, state, shuffled, device=device)
    on_cpu = weight_matching(spec, state, shuffled, device="cpu")
    assert all(torch.equal(on_gpu[n], on_cpu[n]) for n in on_cpu)

    def moved(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in tensors.items()}

    graph_module = trace(model).to(device)
    found = pair_statistics(graph_module, spec, moved(state), moved(shuffled), [x.to(device)])
    expected = pair_statistics(trace(model), spec, state, shuffled, [x])
    for group in spec.groups:
        torch.testing.assert_close(
            found[group.name].sum_xy.cpu(), expected[group.name].sum_xy, rtol=1e-4, atol=1e-3
        )


def test_fit_step_on_the_gpu_matches_the_cpu_in_fp32() -> None:
    torch.manual_seed(0)
    models = [build_model("mlp", {"depth": 3, "hidden": 32}).state_dict() for _ in range(2)]
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    results = {}
    for device in ("cpu", "cuda"):
        module = build_model("mlp", {"depth": 3, "hidden": 32}).to(device)
        names = [n for n, _ in module.named_parameters()]
        flat = FlatParameters.stack(models, names, torch.device(device))
        config = FitConfig(
            granularity="parameter", optimizer="adam", lr=0.05, epochs=1, steps=None,
            batch_size=64, l2=0.0, seed=0, checkpoint_every=0,
        )  # fmt: skip
        logits = torch.zeros(logits_per_model("parameter", flat))
        target = y.to(device)

        def loss_fn(outputs: torch.Tensor, _index: torch.Tensor, target=target) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(outputs, target)

        step = CoefficientStep(
            module, flat, {}, pairwise_merge, logits, loss_fn, config, torch.device(device)
        )
        for _ in range(3):
            step.update(step.loss(x.to(device), torch.arange(64, device=device)))
        results[device] = step.logits.detach().cpu()
    torch.testing.assert_close(results["cuda"], results["cpu"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_np_merge_recipe_runs_on_the_gpu(tmp_path: Path, trained_pair, precision: str) -> None:
    a, b = trained_pair
    recipe = write_recipe(tmp_path, a, b)
    text = recipe.read_text().replace(
        "  - merge: {method: average}",
        "  - align: {method: weight_matching}\n"
        "  - fit: {method: np_merge, epochs: 2, lr: 0.05, batch_size: 128}",
    )
    text = text.replace("steps:", f"device: cuda\nprecision: {precision}\nsteps:", 1)
    text = text.replace("data:\n", 'data:\n  fit: {source: mnist, split: "0:2000"}\n', 1)
    recipe.write_text(text)
    run_cli("--log", "plain", "run", str(recipe), check=True)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {r["kind"]: r for r in report["evaluate"]["results"]}
    best_endpoint = max(r["accuracy"] for r in report["evaluate"]["results"][:2])
    assert rows["merged"]["accuracy"] > best_endpoint - 0.1
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in merged.values())


def test_a_sharded_stack_on_the_gpu_merges_as_the_flat_buffer_in_bf16() -> None:
    """`shard: fsdp`'s parametrized module on CUDA with a bf16 stack (one process: no FSDP
    collectives; two ranks need two GPUs) against the flat bf16 buffer: the same forward."""
    from mergecli.fit.coefficients import merged_weights
    from mergecli.fit.sharded import ShardedStack
    from mergecli.models.forward import functional_logits, model_logits
    from mergecli.runtime.distributed import World

    cuda = torch.device("cuda")
    torch.manual_seed(0)
    models = [build_model("mlp", {"depth": 3, "hidden": 64}).state_dict() for _ in range(2)]
    module = build_model("mlp", {"depth": 3, "hidden": 64}).to(cuda).eval()
    names = [n for n, _ in module.named_parameters()]
    flat = FlatParameters.stack(models, names, cuda, torch.bfloat16)
    logits = 0.3 * torch.randn(logits_per_model("row", flat), device=cuda)
    x = torch.randn(16, 1, 28, 28, device=cuda)
    with torch.autocast("cuda", torch.bfloat16):
        weights = merged_weights(flat, pairwise_merge, logits, "row", flat.group_index("row"))
        expected = functional_logits(module, weights, x).float()
        sharded = ShardedStack(
            build_model("mlp", {"depth": 3, "hidden": 64}).to(cuda).eval(), models, names,
            "row", pairwise_merge, torch.bfloat16, cuda, World(), {},
        )  # fmt: skip
        with sharded.using(logits):
            got = model_logits(sharded.module, x).float()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_in_mixed_precision_on_the_gpu(tmp_path: Path, precision: str) -> None:
    out = tmp_path / f"{precision}.safetensors"
    run_cli("--log", "plain", "train", "--arch", "resnet20", "--arg", "width=0.5",
            "--arg", "in_channels=1", "--data", "mnist:0:2000", "--eval-data", "mnist:9000:10000",
            "--epochs", "3", "--batch-size", "64", "--optimizer", "sgd", "--lr", "0.1",
            "--schedule", "onecycle",
            "--weight-decay", "5e-4", "--label-smoothing", "0.1", "--precision", precision,
            "--device", "cuda", "--out", str(out), check=True)  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["mergecli.training"])["precision"] == precision
    assert float(meta["mergecli.eval_accuracy"]) > 0.8
    assert all(t.dtype == torch.float32 for t in load_file(out).values() if t.is_floating_point())


def test_zipit_on_the_gpu_zips_as_the_cpu(tmp_path: Path, trained_pair) -> None:
    merged = {}
    for device in ("cpu", "cuda"):
        folder = tmp_path / device
        folder.mkdir()
        recipe = write_recipe(folder, *trained_pair)
        text = recipe.read_text().replace(
            "  - merge: {method: average}",
            "  - align: {method: zipit}\n  - merge: {method: average}",
        )
        text = text.replace("steps:", f"device: {device}\nsteps:", 1)
        text = text.replace("data:\n", 'data:\n  fit: {source: mnist, split: "0:2000"}\n', 1)
        recipe.write_text(text)
        run_cli("--log", "plain", "run", str(recipe), check=True)
        merged[device] = load_file(folder / "out" / "model.safetensors")
    # Correlations from float64 sums on either device; the greedy matching runs on the CPU.
    for name, tensor in merged["cpu"].items():
        torch.testing.assert_close(merged["cuda"][name], tensor, atol=1e-5, rtol=1e-5)
