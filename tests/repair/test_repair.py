"""The `repair` step: BN reset and REPAIR, checked against statistics computed independently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from helpers import run_cli
from mergecli.data import load_data
from mergecli.errors import MergeCliError
from mergecli.models import build_model
from mergecli.models.batchnorm import batchnorm_buffers, reset_batchnorm_stats
from mergecli.pipeline import prepare_state, run_recipe
from mergecli.recipe import load_recipe
from mergecli.registry import methods_of
from mergecli.repair.repair import repair, repairable_layers
from mergecli.repair.step import RepairParams, ResetBNParams, repair_step, reset_bn
from mergecli.runtime.log import Log

BATCH = 128
MLP4 = {"depth": 4, "hidden": 32}


@pytest.fixture(scope="module")
def images() -> Tensor:
    return load_data({"source": "mnist", "split": "0:512"}).x


def batches(x: Tensor, size: int = BATCH) -> list[Tensor]:
    return list(x.split(size))


def random_mlp(seed: int, **args: object) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", {**MLP4, **args})


def averaged(a: dict[str, Tensor], b: dict[str, Tensor], wa: float, wb: float) -> dict:
    return {k: (wa * a[k] + wb * b[k]) / (wa + wb) for k in a}


def output_stats(
    module: nn.Module, state: dict[str, Tensor], xs: list[Tensor]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel mean and population std of every Linear's output, computed in float64."""
    module.load_state_dict(state)
    module.eval()
    outputs: dict[str, list[Tensor]] = {}
    handles = [
        layer.register_forward_hook(
            lambda _m, _i, out, name=name: outputs.setdefault(name, []).append(out.double())
        )
        for name, layer in module.named_modules()
        if isinstance(layer, nn.Linear)
    ]
    with torch.no_grad():
        for x in xs:
            module(x)
    for handle in handles:
        handle.remove()
    stats = {}
    for name, chunks in outputs.items():
        y = torch.cat(chunks)
        stats[name] = (y.mean(0), y.std(0, unbiased=False))
    return stats


# ---------------------------------------------------------------------------------- reset_bn


def test_reset_bn_matches_batch_statistics_by_hand(images: Tensor) -> None:
    model = random_mlp(0, depth=3, batchnorm=True)
    with torch.no_grad():
        for norm in model.norms:
            # Non-trivial affine parameters, so the second BN's input depends on the first's.
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-0.5, 0.5)
            norm.running_mean.fill_(5.0)
            norm.running_var.fill_(100.0)
    xs = batches(images)

    # By hand: train-mode BN normalises with the batch mean and the *biased* variance, and
    # with momentum=None keeps the average of the per-batch means and *unbiased* variances.
    means: list[list[Tensor]] = [[], []]
    variances: list[list[Tensor]] = [[], []]
    with torch.no_grad():
        for x in xs:
            h = x.flatten(1)
            for i, (layer, norm) in enumerate(zip(model.layers, model.norms, strict=True)):
                h = layer(h)
                means[i].append(h.mean(0))
                variances[i].append(h.var(0, unbiased=True))
                normalised = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + norm.eps)
                h = F.relu(normalised * norm.weight + norm.bias)

    layers, used = reset_batchnorm_stats(model, iter(xs))
    assert (layers, used) == (2, len(xs))
    buffers = batchnorm_buffers(model)
    for i in range(2):
        expected_mean = torch.stack(means[i]).mean(0)
        expected_var = torch.stack(variances[i]).mean(0)
        torch.testing.assert_close(
            buffers[f"norms.{i}.running_mean"], expected_mean, atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            buffers[f"norms.{i}.running_var"], expected_var, atol=1e-4, rtol=1e-4
        )
        assert buffers[f"norms.{i}.num_batches_tracked"].item() == len(xs)
    assert not model.training


def test_reset_bn_skips_a_one_example_last_batch(images: Tensor) -> None:
    model = random_mlp(0, depth=3, batchnorm=True)
    xs = batches(images[:257])  # 128, 128, 1
    assert reset_batchnorm_stats(model, iter(xs)) == (2, 2)


# ---------------------------------------------------------------------------------- REPAIR


def test_repairable_layers_with_and_without_the_output_layer() -> None:
    names = [name for name, _ in repairable_layers(random_mlp(0))]
    assert names == ["layers.0", "layers.1", "layers.2", "head"]
    names = [name for name, _ in repairable_layers(random_mlp(0), include_head=False)]
    assert names == ["layers.0", "layers.1", "layers.2"]


def test_repair_of_identical_models_changes_nothing(images: Tensor) -> None:
    model = random_mlp(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    xs = batches(images)
    result = repair(model, state, [state, state], torch.tensor([0.5, 0.5]), lambda: iter(xs))
    assert result.repaired == ["layers.0", "layers.1", "layers.2", "head"] and not result.skipped
    for key, tensor in state.items():
        torch.testing.assert_close(result.state_dict[key], tensor, atol=1e-5, rtol=0)


@pytest.mark.parametrize("include_head", [True, False])
def test_repair_sets_the_interpolated_endpoint_statistics(
    images: Tensor, include_head: bool
) -> None:
    model = random_mlp(0)
    a = random_mlp(0).state_dict()
    b = random_mlp(1).state_dict()
    wa, wb = 1.0, 3.0
    merged = averaged(a, b, wa, wb)
    xs = batches(images)
    stats_a, stats_b = output_stats(model, a, xs), output_stats(model, b, xs)
    before = output_stats(model, merged, xs)

    result = repair(
        model, merged, [a, b], torch.tensor([wa, wb]), lambda: iter(xs), include_head=include_head
    )
    after = output_stats(model, result.state_dict, xs)

    hidden = ["layers.0", "layers.1", "layers.2"]
    assert result.repaired == hidden + ["head"] * include_head
    collapsed = False
    for name in result.repaired:
        target_mean = (wa * stats_a[name][0] + wb * stats_b[name][0]) / (wa + wb)
        target_std = (wa * stats_a[name][1] + wb * stats_b[name][1]) / (wa + wb)
        mean, std = after[name]
        scale = target_std.mean()
        torch.testing.assert_close(mean, target_mean, atol=1e-3 * scale.item(), rtol=0)
        torch.testing.assert_close(std, target_std, rtol=1e-3, atol=0)
        # The function reports the same targets it reached.
        torch.testing.assert_close(result.targets[name][1], target_std, rtol=1e-6, atol=1e-9)
        collapsed |= bool((before[name][1] < 0.9 * target_std).float().mean() > 0.5)
    # The averaged random networks really had collapsed variance, so the test means something.
    assert collapsed
    if not include_head:
        # The output layer is left as merged.
        torch.testing.assert_close(result.state_dict["head.weight"], merged["head.weight"])
        torch.testing.assert_close(result.state_dict["head.bias"], merged["head.bias"])


def notebook_repair_logits(
    endpoints: list[dict[str, Tensor]], merged: dict[str, Tensor], x: Tensor, depth: int, eps: float
) -> Tensor:
    """REPAIR as the paper's notebook runs it on an MLP (Jordan et al., KellerJordan/REPAIR,
    Train-and-Permute-MNIST-MLP-NoBatchNorm): a BatchNorm1d after every Linear, the head
    included; the endpoints' running statistics over the data; goal mean = the mean of their
    means, goal std = the mean of their stds; the merged network's BatchNorms set to that goal
    and run in train mode over the data (each one normalises its layer's output, upstream ones
    already corrected), then evaluated in eval mode on their running statistics. One batch of
    all of ``x``, and momentum None, so the running statistics are the data's. ``eps`` is the
    notebook's 1e-5 (BatchNorm's and the goal std's)."""
    names = [f"layers.{i}" for i in range(depth - 1)] + ["head"]

    def forward(state: dict[str, Tensor], norms: list[nn.BatchNorm1d], rescale: bool) -> Tensor:
        h = x.flatten(1)
        for name, norm in zip(names, norms, strict=True):
            h = F.linear(h, state[f"{name}.weight"], state[f"{name}.bias"])
            out = norm(h)
            h = out if rescale else h
            h = torch.relu(h) if name != "head" else h
        return h

    def tracked(state: dict[str, Tensor]) -> list[nn.BatchNorm1d]:
        norms = [nn.BatchNorm1d(state[f"{n}.bias"].numel(), eps, None) for n in names]
        with torch.no_grad():
            forward(state, norms, rescale=False)
        return norms

    ends = [tracked(state) for state in endpoints]
    norms = [
        nn.BatchNorm1d(state.numel(), eps, None) for state in (merged[f"{n}.bias"] for n in names)
    ]
    with torch.no_grad():
        for norm, *pair in zip(norms, *ends, strict=True):
            goal_mean = sum(e.running_mean for e in pair) / len(pair)
            goal_var = (sum(e.running_var.sqrt() for e in pair) / len(pair)).square()
            norm.bias.copy_(goal_mean)
            norm.weight.copy_((goal_var + eps).sqrt())
        forward(merged, norms, rescale=True)  # train mode: collects the running statistics
        for norm in norms:
            norm.eval()
        return forward(merged, norms, rescale=True)


def test_repair_with_the_head_is_the_notebooks_algorithm() -> None:
    x = load_data({"source": "mnist", "split": "0:2000"}).x
    model = random_mlp(0)
    a, b = random_mlp(0).state_dict(), random_mlp(1).state_dict()
    merged = averaged(a, b, 1.0, 1.0)
    # The notebook puts its eps under the square root (sqrt(var + eps)), REPAIR here beside
    # the std (std + eps); on random networks, whose logits have a std near 0.02, 1e-5 under
    # the root moves them by 2%, so both run with eps -> 0.
    eps = 1e-9
    expected = notebook_repair_logits([a, b], merged, x, MLP4["depth"], eps)

    def logits(include_head: bool) -> Tensor:
        result = repair(
            model, merged, [a, b], torch.tensor([1.0, 1.0]), lambda: iter(batches(x, 256)),
            eps=eps, include_head=include_head,
        )  # fmt: skip
        model.load_state_dict(result.state_dict)
        with torch.no_grad():
            return model(x)

    # What remains: the notebook's BatchNorm keeps the unbiased variance (n / (n - 1) on 2,000
    # examples), a few 1e-4 relative per layer.
    scale = expected.std().item()
    torch.testing.assert_close(logits(True), expected, rtol=0, atol=5e-3 * scale)
    # Without the head, the logits are far from the notebook's: the test tells them apart.
    assert (logits(False) - expected).abs().mean() > 0.1 * scale


def test_repair_of_bias_free_layers_folds_only_the_scale(images: Tensor) -> None:
    class NoBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, bias=False)
            self.head = nn.Linear(4 * 26 * 26, 10)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    model, a, b = NoBias(), NoBias().state_dict(), NoBias().state_dict()
    merged = averaged(a, b, 1.0, 1.0)
    xs = batches(images[:256])
    result = repair(model, merged, [a, b], torch.tensor([1.0, 1.0]), lambda: iter(xs))
    assert result.scale_only == ["conv"] and result.repaired == ["head"]

    def conv_std(state: dict[str, Tensor]) -> Tensor:
        model.load_state_dict(state)
        with torch.no_grad():
            y = torch.cat([model.conv(x) for x in xs]).double()
        return y.transpose(0, 1).flatten(1).std(1, unbiased=False)

    target = (conv_std(a) + conv_std(b)) / 2
    torch.testing.assert_close(conv_std(result.state_dict), target, rtol=1e-3, atol=0)


def test_repair_refuses_negative_weights(images: Tensor) -> None:
    model = random_mlp(0)
    state = model.state_dict()
    with pytest.raises(MergeCliError, match="weights"):
        repair(model, state, [state, state], torch.tensor([1.0, -1.0]), lambda: iter([images]))


# ---------------------------------------------------------------------------------- the steps


def write_pair(tmp_path: Path, steps: str, **args: object) -> Path:
    """Two random-init MLP checkpoints and a recipe running ``steps`` over them."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"m{seed}.safetensors")
        save_file(random_mlp(seed, **args).state_dict(), paths[-1])
    model_args = json.dumps({**MLP4, **args})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"version: 1\nmodel: {{arch: mlp, args: {model_args}}}\n"
        f"checkpoints: [{{path: {paths[0]}}}, {{path: {paths[1]}, weight: 3}}]\n"
        f'data: {{fit: {{source: mnist, split: "0:512", batch_size: {BATCH}}}}}\n'
        f"steps: {steps}\noutput: {{dir: {tmp_path / 'out'}}}\n"
    )
    return recipe


def test_methods_are_registered_with_their_parameters() -> None:
    methods = methods_of("repair")
    assert methods["reset_bn"].params.model_fields["batches"].default is None
    assert methods["repair"].params.model_fields["batches"].default == 10
    assert methods["repair"].needs == {"model", "data.fit"}
    assert "Jordan et al., 2022" in methods["repair"].doc
    with pytest.raises(ValueError):
        ResetBNParams(batches=0)


def test_reset_bn_step_on_batchnorm_models(tmp_path: Path, images: Tensor) -> None:
    steps = "[{merge: {method: average}}, {repair: {method: reset_bn, batches: 3}}]"
    state = run_recipe(load_recipe(write_pair(tmp_path, steps, batchnorm=True)), Log("plain"))
    assert state.report["repair"] == {"method": "reset_bn", "layers": 3, "batches": 3}
    written = load_file(tmp_path / "out" / "model.safetensors")
    # The same as resetting the averaged model by hand on the first three batches.
    model = random_mlp(0, batchnorm=True)
    a, b = random_mlp(0, batchnorm=True).state_dict(), random_mlp(1, batchnorm=True).state_dict()
    model.load_state_dict(
        {k: averaged(a, b, 1.0, 3.0)[k] if v.is_floating_point() else v for k, v in a.items()}
    )
    reset_batchnorm_stats(model, iter(batches(images)[:3]))
    for key, value in batchnorm_buffers(model).items():
        torch.testing.assert_close(written[key], value, atol=1e-5, rtol=1e-5)
    assert written["norms.0.num_batches_tracked"].dtype == torch.int64


def test_each_method_refuses_the_other_kind_of_network(tmp_path: Path) -> None:
    plain = prepare_state(
        load_recipe(write_pair(tmp_path / "plain", "[repair: repair]")), Log("plain")
    )
    plain.merged = plain.reference.tensors
    with pytest.raises(MergeCliError, match="no BatchNorm layers; use `repair: {method: repair}`"):
        reset_bn(plain, ResetBNParams())
    bn = prepare_state(
        load_recipe(write_pair(tmp_path / "bn", "[repair: repair]", batchnorm=True)), Log("plain")
    )
    bn.merged = bn.reference.tensors
    with pytest.raises(MergeCliError, match="reset_bn"):
        repair_step(bn, RepairParams())


def test_repair_needs_a_merged_model(tmp_path: Path) -> None:
    state = prepare_state(load_recipe(write_pair(tmp_path, "[repair: repair]")), Log("plain"))
    with pytest.raises(MergeCliError, match="put a `merge`"):
        repair_step(state, RepairParams())


@pytest.mark.slow
def test_cli_average_then_repair(tmp_path: Path, trained_pair: tuple[Path, Path]) -> None:
    a, b = trained_pair
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""\
version: 1
model: {{arch: mlp, args: {{depth: 3, hidden: 32}}}}
checkpoints: [{{path: {a}}}, {{path: {b}}}]
data:
  fit: {{source: mnist, split: "0:512", batch_size: {BATCH}}}
  eval: {{source: mnist, split: "9000:"}}
steps:
  - merge: {{method: average}}
  - repair: {{method: repair}}
  - evaluate: {{baselines: [endpoints, average]}}
output: {{dir: {tmp_path / "out"}}}
"""
    )
    result = run_cli("--log", "plain", "run", str(recipe), check=True)
    assert (
        "repair: corrected 3 layers over 4 batches (the output layer 'head' too)" in result.stderr
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["repair"] == {
        "method": "repair",
        "layers": 3,
        "batches": 4,
        "include_head": True,
        "head": "head",
        "head_corrected": True,
    }
    assert (
        "## Repair\n\nMethod `repair`: 3 layers over 4 batches of data.fit; the output layer "
        "`head` corrected too (as in the REPAIR notebooks)."
    ) in (tmp_path / "out" / "report.md").read_text()
    rows = {row["name"]: row for row in report["evaluate"]["results"]}
    assert set(rows) >= {"average", "merged (average + repair)"}

    xs = batches(load_data({"source": "mnist", "split": "0:512"}).x)
    model = build_model("mlp", {"depth": 3, "hidden": 32})
    ta, tb = load_file(a), load_file(b)
    repaired = output_stats(model, load_file(tmp_path / "out" / "model.safetensors"), xs)
    plain = output_stats(model, averaged(ta, tb, 1.0, 1.0), xs)
    ends = output_stats(model, ta, xs), output_stats(model, tb, xs)
    for name in ("layers.0", "layers.1", "head"):
        target = (ends[0][name][1] + ends[1][name][1]) / 2
        # The averaged model's std is off from the endpoints'; the repaired one's matches.
        assert (plain[name][1] - target).abs().mean() > 10 * (
            repaired[name][1] - target
        ).abs().mean()

    # include_head: false leaves the output layer as averaged, and the report says so.
    run_cli("run", str(recipe), "--set", "steps.1.repair.include_head=false", "--set",
            f"output.dir={tmp_path / 'hidden'}", check=True)  # fmt: skip
    hidden_only = load_file(tmp_path / "hidden" / "model.safetensors")
    for key in ("head.weight", "head.bias"):
        torch.testing.assert_close(hidden_only[key], (ta[key] + tb[key]) / 2)
    report = json.loads((tmp_path / "hidden" / "report.json").read_text())
    assert report["repair"]["layers"] == 2 and report["repair"]["head_corrected"] is False
    assert (
        "the output layer `head` left as merged." in (tmp_path / "hidden" / "report.md").read_text()
    )


def test_repair_follows_execution_order_and_skips_unhooked_layers(images: Tensor) -> None:
    class Unordered(nn.Module):
        """Registers its layers out of execution order and uses one weight functionally."""

        def __init__(self) -> None:
            super().__init__()
            self.second = nn.Linear(32, 32)
            self.first = nn.Linear(784, 32)
            self.functional = nn.Linear(32, 32)
            self.head = nn.Linear(32, 10)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.second(torch.relu(self.first(x.flatten(1)))))
            h = torch.relu(F.linear(h, self.functional.weight, self.functional.bias))
            return self.head(h)

    torch.manual_seed(0)
    model, a, b = Unordered(), Unordered().state_dict(), Unordered().state_dict()
    merged = averaged(a, b, 1.0, 1.0)
    xs = batches(images)
    result = repair(model, merged, [a, b], torch.tensor([1.0, 1.0]), lambda: iter(xs))
    assert result.repaired == ["first", "second", "head"]
    assert list(result.skipped) == ["functional"]
    # `second` was measured after `first` was corrected, so it ends on target.
    after = output_stats(model, result.state_dict, xs)
    torch.testing.assert_close(after["second"][1], result.targets["second"][1], rtol=1e-3, atol=0)
