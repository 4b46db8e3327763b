"""Alignment: specs derived from the graph, and matching methods that recover permutations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mergecli.align.spec as spec_module
from fixtures.align_models import MODELS, GatedChunks, GroupNormResNet, Inception, TorchTransformer
from fixtures.tutorial_cnn import TutorialNet
from fixtures.user_models import USER_MODELS, ChannelsLastClassifier
from helpers import permuted_copy
from mergecli.align.activation_matching import match_activations, match_unread_heads
from mergecli.align.activations import PairStatistics, check_finite, pair_statistics
from mergecli.align.cca import cca_transform
from mergecli.align.groups import AxisSlice, PermGroup, PermutationSpec, split_flattened
from mergecli.align.permute import (
    apply_permutations,
    check_spec,
    random_permutations,
)
from mergecli.align.spec import derive_spec
from mergecli.align.step import load_alignment
from mergecli.align.tracing import trace
from mergecli.align.transform import apply_transforms
from mergecli.align.weight_matching import current_cost, prepare, weight_matching
from mergecli.errors import MergeCliError
from mergecli.models import build_model


@pytest.mark.parametrize("name", list(MODELS))
def test_spec_preserves_function_and_weight_matching_recovers_permutation(name: str) -> None:
    factory, shape, groups = MODELS[name]
    model, x, spec, state, shuffled = permuted_copy(factory, shape)
    assert len(spec.groups) == groups, [g.name for g in spec.groups]
    check_spec(model, spec, x)
    # The shuffled model is the same function with other weights...
    other = factory().eval()
    other.load_state_dict(shuffled)
    torch.testing.assert_close(other(x), model(x), rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(shuffled[k], state[k]) for k in state)
    # ...and weight matching brings every weight back exactly.
    found = weight_matching(spec, state, shuffled)
    aligned = apply_permutations(shuffled, spec, found)
    for key in state:
        assert torch.equal(aligned[key], state[key]), key


@pytest.mark.parametrize("name", list(USER_MODELS))
def test_user_models_align_or_say_why_not(name: str) -> None:
    factory, shape, groups, warned = USER_MODELS[name]
    model, x, spec, state, shuffled = permuted_copy(factory, shape)
    assert len(spec.groups) == groups, [g.name for g in spec.groups]
    assert bool(spec.warnings) == bool(warned), spec.warnings
    assert all(warned in w for w in spec.warnings), spec.warnings
    check_spec(model, spec, x)
    aligned = apply_permutations(shuffled, spec, weight_matching(spec, state, shuffled))
    assert all(torch.equal(aligned[key], state[key]) for key in state)


@pytest.mark.parametrize("per_block", [True, False], ids=["cached-blocks", "one-matmul"])
@pytest.mark.parametrize(
    "name",
    [
        "resnet20",
        "vgg16-bn",
        "vit",
        "inception",
        "tutorial-cnn",
        "flattened-concat",
        "torch-transformer",
        "groupnorm-resnet",
        "gated-chunks",
    ],
)
def test_weight_matching_cost_is_the_sum_over_members_of_a_times_permuted_b(
    name: str, per_block: bool
) -> None:
    # Independent formula: B' = B with every group's current permutation applied
    # (apply_permutations), a member's own units put back in B's order (other axes of the
    # same tensor may belong to g too: a conv from a residual stream into it), then
    # cost_g = sum over g's members of A_m (units as rows) @ B'_m (units as rows)^T.
    factory, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model_a, model_b = factory().eval(), factory().eval()
    spec = derive_spec(model_a, torch.randn(2, *shape))
    a, b = model_a.state_dict(), model_b.state_dict()
    costs, flat, perms, _ = prepare(spec, a, b, "cpu", per_block)
    version = dict.fromkeys(perms, 0)
    for sweep in range(2):  # the second pass reuses cached blocks of unchanged neighbours
        chosen = random_permutations(spec, torch.Generator().manual_seed(sweep))
        for g in spec.groups[sweep::2]:
            perms[g.name][:] = chosen[g.name].numpy()
            version[g.name] += 1
        b_permuted = apply_permutations(b, spec, {n: torch.as_tensor(p) for n, p in perms.items()})
        for group in spec.groups:
            back = torch.argsort(torch.as_tensor(perms[group.name]))
            expected = sum(
                _units_as_rows(a[m.tensor], m).double()
                @ _units_as_rows(b_permuted[m.tensor], m)[back].double().T
                for m in group.members
            )
            found = current_cost(costs[group.name], flat, version)
            np.testing.assert_allclose(found, expected.numpy(), rtol=1e-4, atol=1e-4)


def _units_as_rows(tensor: torch.Tensor, m: AxisSlice) -> torch.Tensor:
    part = tensor.narrow(m.axis, m.offset * m.inner, m.length * m.inner)
    return part.unflatten(m.axis, (m.length, m.inner)).movedim(m.axis, 0).reshape(m.length, -1)


def test_mlp_spec_groups_and_members() -> None:
    model = build_model("mlp", {"depth": 3, "hidden": 8, "batchnorm": True})
    spec = derive_spec(model, torch.randn(2, 784))
    first = spec.group("layers.0")
    members = {(m.tensor, m.axis, m.role) for m in first.members}
    assert members == {
        ("layers.0.weight", 0, "out"),
        ("layers.0.bias", 0, "out"),
        ("norms.0.weight", 0, "unit_norm"),
        ("norms.0.bias", 0, "unit_norm"),
        ("norms.0.running_mean", 0, "unit_norm"),
        ("norms.0.running_var", 0, "unit_norm"),
        ("layers.1.weight", 1, "in"),
    }
    # Input and output axes are never permuted.
    tensors_axes = {(m.tensor, m.axis) for g in spec.groups for m in g.members}
    assert ("layers.0.weight", 1) not in tensors_axes and ("head.weight", 0) not in tensors_axes


def test_concat_along_channels_is_blocks() -> None:
    model = Inception().eval()
    x = torch.randn(2, 3, 8, 8)
    spec = derive_spec(model, x)
    slices = {(m.tensor, m.offset, m.length) for g in spec.groups for m in g.members}
    assert ("mix.weight", 0, 4) in slices and ("mix.weight", 4, 6) in slices
    check_spec(model, spec, x)


def test_flatten_after_conv_moves_each_channel_as_a_run_of_positions() -> None:
    model = TutorialNet().eval()
    x = torch.randn(2, 3, 32, 32)
    spec = derive_spec(model, x)
    consumer = next(m for m in spec.group("conv2").members if m.tensor == "fc1.weight")
    assert (consumer.axis, consumer.offset, consumer.length, consumer.inner) == (1, 0, 16, 25)
    # Channel c of conv2 is columns 25c .. 25c + 24 of fc1: permuting the channels moves
    # those runs whole, and the activation to match stays the conv map (units on axis 1).
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    moved = apply_permutations(model.state_dict(), spec, {"conv2": perm})
    expected = model.fc1.weight.unflatten(1, (16, 25))[:, perm].flatten(1)
    assert torch.equal(moved["fc1.weight"], expected)
    assert spec.group("conv2").activation_axis == 1
    check_spec(model, spec, x)

    # Units after positions (channels last) cannot move as runs: left unpermuted, said so.
    spec = derive_spec(ChannelsLastClassifier(), torch.randn(2, 2, 2, 2))
    assert spec.groups == () and "flattens units together with axes before them" in str(
        spec.warnings
    )


def test_groupnorm_groups_and_chunks_cut_units_into_pieces() -> None:
    spec = derive_spec(GroupNormResNet(), torch.randn(2, 3, 6, 6))
    norm2 = sorted(
        (m.offset, m.length) for g in spec.groups for m in g.members if m.tensor == "norm2.weight"
    )
    assert norm2 == [(0, 2), (2, 2), (4, 2), (6, 2)]  # channels stay within their GroupNorm group
    per_channel = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(8, 8), nn.Conv2d(8, 2, 1))
    assert [g.size for g in derive_spec(per_channel, torch.randn(2, 3, 4, 4)).groups] == [8]
    spec = derive_spec(GatedChunks(), torch.randn(2, 6))
    [gated] = [
        g
        for g in spec.groups
        if ("gate_value.weight", 0) in {(m.tensor, m.axis) for m in g.members}
    ]
    rows = sorted(m.offset for m in gated.members if m.tensor == "gate_value.weight")
    assert gated.size == 12 and rows == [0, 12]  # value and gate halves move alike
    assert (gated.activation_axis, gated.activation_offset) == (1, 0)


def test_embedding_units_are_a_group_and_token_ids_stay_integers() -> None:
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids).mean(1))

    model = Bag().eval()
    x = torch.randint(0, 50, (4, 7))
    spec = derive_spec(model, x)
    members = {(m.tensor, m.axis) for m in spec.group("embed").members}
    assert members == {("embed.weight", 1), ("head.weight", 1)}
    check_spec(model, spec, x)
    shuffled = apply_permutations(
        model.state_dict(), spec, random_permutations(spec, torch.Generator().manual_seed(0))
    )
    found = weight_matching(spec, model.state_dict(), shuffled)
    assert torch.equal(
        apply_permutations(shuffled, spec, found)["embed.weight"], model.embed.weight
    )


def test_attention_permutes_its_inputs_together_or_not_at_all() -> None:
    spec = derive_spec(TorchTransformer(), torch.randn(2, 5, 6))
    stream = next(g for g in spec.groups if g.size == 16)
    members = {(m.tensor, m.axis) for m in stream.members}
    assert ("encoder.layers.1.self_attn.in_proj_weight", 1) in members
    assert ("encoder.layers.1.self_attn.out_proj.weight", 0) in members
    assert not any(m.tensor.endswith("in_proj_weight") and m.axis == 0 for m in stream.members)

    class QueryOnly(nn.Module):  # keys and values are the model's input: never permuted
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(6, 6)
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(self.q(x), x, x, need_weights=False)[0].mean(1))

    model = QueryOnly().eval()
    x = torch.randn(2, 5, 6)
    spec = derive_spec(model, x)
    # Exported, the attention is its ops: q's units meet the input's (fixed) in the
    # projections, so they stay; out_proj's units, read only by the head, are a group.
    assert [g.name for g in spec.groups] == ["attn.out_proj"]
    assert "units of 'q' left unpermuted" in " ".join(spec.warnings)
    check_spec(model, spec, x)


def test_unhandled_operation_leaves_group_unpermuted_with_warning() -> None:
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 8)
            self.fc2 = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc1(x))
            h = torch.cumsum(self.fc2(h), dim=-1)  # mixes units in order: not permutable
            return self.head(h)

    model = Gated().eval()
    x = torch.randn(3, 4)
    spec = derive_spec(model, x)
    assert [g.name for g in spec.groups] == ["fc1"]
    assert any("'fc2' left unpermuted" in w and "cumsum" in w for w in spec.warnings)
    check_spec(model, spec, x)


def test_self_check_names_a_wrong_group() -> None:
    model = build_model("mlp", {"depth": 3, "hidden": 8}).eval()
    x = torch.randn(2, 784)
    # Forget the consumer of layers.0: permuting it now changes the function.
    wrong = PermGroup(
        "layers.0",
        8,
        (AxisSlice("layers.0.weight", 0, 0, 8, "out"), AxisSlice("layers.0.bias", 0, 0, 8, "out")),
        "relu",
        1,
    )
    with pytest.raises(MergeCliError, match="group 'layers.0'"):
        check_spec(model, PermutationSpec((wrong,)), x)


def test_untraceable_submodule_is_kept_whole_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class ShapeDependent(nn.Module):  # Python control flow on a shape: fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.fc(x.mean(1) if x.dim() == 3 else x))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 8)
            self.odd = ShapeDependent()
            self.c, self.head = nn.Linear(8, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.odd(F.relu(self.b(F.relu(self.a(x)))))
            return self.head(F.relu(self.c(h)))

    model = Model().eval()
    x = torch.randn(3, 4)
    # torch.export specialises the shape test on the example input: every layer is a group.
    spec = derive_spec(model, x)
    assert spec.traced_with == "torch.export"
    assert [g.name for g in spec.groups] == ["a", "b", "odd.fc", "c"]
    assert spec.warnings == ()
    check_spec(model, spec, x)

    # Where export fails, fx traces it, keeping the submodule it cannot trace whole.
    def no_export(*args: object) -> None:
        raise RuntimeError("export failed\non purpose")

    monkeypatch.setattr(spec_module, "export_graph", no_export)
    spec = derive_spec(model, x)
    assert spec.traced_with == "torch.fx"
    # b's units enter the opaque module, so they stay; a and c around it are still groups.
    assert [g.name for g in spec.groups] == ["a", "c"]
    fell_back, warning = spec.warnings
    assert (
        fell_back
        == "torch.export failed (RuntimeError: export failed on purpose); traced with torch.fx"
    )
    assert "units of 'b' left unpermuted: odd (ShapeDependent) cannot be traced" in warning
    check_spec(model, spec, x)


def test_untraceable_model_is_one_line_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else -x

    with pytest.raises(MergeCliError, match="torch.fx cannot trace it") as info:
        trace(Branchy())
    assert "\n" not in str(info.value)


def test_activation_matching_recovers_permutation_of_the_same_model() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", {"depth": 4, "hidden": 16}).eval()
    x = torch.randn(256, 784)
    spec = derive_spec(model, x[:2])
    state = model.state_dict()
    perms = random_permutations(spec, torch.Generator().manual_seed(3))
    shuffled = apply_permutations(state, spec, perms)
    stats = pair_statistics(trace(model), spec, state, shuffled, [x[:128], x[128:]])
    found = match_activations(stats)
    aligned = apply_permutations(shuffled, spec, found)
    for key in state:
        torch.testing.assert_close(aligned[key], state[key])


@pytest.mark.parametrize("name", ["torch-transformer", "groupnorm-resnet", "gated-chunks"])
def test_activation_matching_recovers_permutations_of_smooth_models(name: str) -> None:
    # Smooth activations (no dead ReLU units, whose order no activation can tell), including
    # groups whose units are a slice of their activation (GroupNorm groups, chunks).
    factory, shape, _ = MODELS[name]
    model, x, spec, state, shuffled = permuted_copy(factory, shape, samples=64, seed=3)
    stats = pair_statistics(trace(model), spec, state, shuffled, [x[:32], x[32:]])
    found = match_activations(stats, spec=spec)
    # nn.MultiheadAttention's q/k/v (its packed in_proj) show no activation to a hook: its heads
    # are matched by their weights once the rest is aligned.
    found = match_unread_heads(spec, found, stats, state, shuffled)
    aligned = apply_permutations(shuffled, spec, found)
    for key in state:
        torch.testing.assert_close(aligned[key], state[key])


def _stats_from(x: torch.Tensor, y: torch.Tensor) -> PairStatistics:
    x, y = x.double(), y.double()
    return PairStatistics(len(x), x.sum(0), y.sum(0), x.T @ x, y.T @ y, x.T @ y)


def test_cca_inverts_an_invertible_linear_map() -> None:
    # If the other model's units are y = R x, CCA without regularisation finds M = R^-1.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 6, generator=generator, dtype=torch.float64) @ torch.randn(
        6, 6, generator=generator, dtype=torch.float64
    )
    r = torch.randn(6, 6, generator=generator, dtype=torch.float64) + 3 * torch.eye(6)
    forward, inverse = cca_transform(_stats_from(x, x @ r.T), gamma=0.0)
    torch.testing.assert_close(forward, torch.linalg.inv(r), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(forward @ inverse, torch.eye(6, dtype=torch.float64))
    # With regularisation the closed-form inverse is still the inverse.
    forward, inverse = cca_transform(_stats_from(x, x @ r.T), gamma=1.0)
    torch.testing.assert_close(forward @ inverse, torch.eye(6, dtype=torch.float64))


def test_linear_transform_preserves_a_linear_network() -> None:
    class Linear2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(5, 7)
            self.fc2 = nn.Linear(7, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.fc1(x))

    model = Linear2().double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    spec = derive_spec(model, x)
    m = torch.randn(7, 7, dtype=torch.float64) + 3 * torch.eye(7, dtype=torch.float64)
    mapped = apply_transforms(
        model.state_dict(), spec, {"fc1": torch.stack([m, torch.linalg.inv(m)])}
    )
    out = torch.func.functional_call(model, mapped, (x,))
    torch.testing.assert_close(out, model(x))
    torch.testing.assert_close(mapped["fc1.weight"], m @ model.fc1.weight)


def test_linear_transform_through_a_flatten_preserves_a_linear_network() -> None:
    # conv (no nonlinearity) -> flatten -> linear: mixing the conv's channels by M at every
    # position and undoing it in the linear's runs of positions keeps the function.
    class ConvFlatten(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 5, 3, padding=1)
            self.fc = nn.Linear(5 * 9, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.conv(x), 1))

    model = ConvFlatten().double().eval()
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    spec = derive_spec(model, x)
    m = torch.randn(5, 5, dtype=torch.float64) + 3 * torch.eye(5, dtype=torch.float64)
    mapped = apply_transforms(
        model.state_dict(), spec, {"conv": torch.stack([m, torch.linalg.inv(m)])}
    )
    torch.testing.assert_close(torch.func.functional_call(model, mapped, (x,)), model(x))


@pytest.mark.parametrize("kind", ["transposed-conv", "embedding"])
def test_linear_transform_through_other_weight_layouts(kind: str) -> None:
    # A transposed conv's weight is (in, out, k, k) and an embedding's (tokens, units): mixing
    # their units by M (no nonlinearity after) and undoing it downstream keeps the function.
    if kind == "transposed-conv":
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ConvTranspose2d(4, 5, 2, stride=2),
            nn.Conv2d(5, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 4), nn.Linear(4, 3))
        x = torch.randint(0, 20, (3, 5))
    model = model.double().eval()
    spec = derive_spec(model, x)
    generator = torch.Generator().manual_seed(0)
    transforms = {}
    for group in spec.groups:
        m = torch.randn(group.size, group.size, generator=generator, dtype=torch.float64)
        m += 3 * torch.eye(group.size, dtype=torch.float64)
        transforms[group.name] = torch.stack([m, torch.linalg.inv(m)])
    assert len(transforms) == 2
    mapped = apply_transforms(model.state_dict(), spec, transforms)
    torch.testing.assert_close(torch.func.functional_call(model, mapped, (x,)), model(x))


def test_a_linear_map_for_a_group_with_norm_layers_is_a_one_line_error() -> None:
    # Only a permutation commutes with a norm layer's per-unit scale; a map saved for a model
    # without the norm (align.from) must be refused, not applied.
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    spec = derive_spec(model, torch.randn(2, 4))
    m = torch.eye(6) + 0.1 * torch.randn(6, 6)
    with pytest.raises(MergeCliError, match="group '0' passes through norm layers") as info:
        apply_transforms(model.state_dict(), spec, {"0": torch.stack([m, torch.linalg.inv(m)])})
    assert "align.from" in str(info.value) and "\n" not in str(info.value)


def test_an_axis_flattened_two_ways_is_a_one_line_error() -> None:
    # p is added to a conv's channels flattened with their positions and to a linear's plain
    # units: two groups permute its one axis in runs of different lengths.
    class TwoWays(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.lin = nn.Conv2d(1, 2, 1), nn.Linear(4, 8)
            self.p = nn.Parameter(torch.randn(8))
            self.h1, self.h2 = nn.Linear(8, 2), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.conv(x).flatten(1) + self.p
            return self.h1(a) + self.h2(self.lin(x.flatten(1)) + self.p)

    model = TwoWays()
    spec = derive_spec(model, torch.randn(3, 1, 2, 2))
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    with pytest.raises(MergeCliError, match="axis 0 of p is shared by groups") as info:
        split_flattened(spec, shapes)
    assert "please report this model" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "transform",
    [
        torch.arange(8.0),  # a permutation as floats
        torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]),  # a unit used twice
        torch.eye(8),  # a map without its inverse
        torch.full((2, 8, 8), float("nan")),
    ],
)
def test_saved_transforms_that_are_none_are_one_line_errors(tmp_path, transform) -> None:
    from safetensors.torch import save_file

    model = build_model("mlp", {"depth": 2, "hidden": 8})
    spec = derive_spec(model, torch.zeros(2, 784))
    path = tmp_path / "alignment.safetensors"
    save_file({"b/layers.0": transform.contiguous()}, path)
    with pytest.raises(MergeCliError, match="transform 'b/layers.0' is neither a permutation of 8"):
        load_alignment(str(path), spec)
    save_file({"b/layers.0": torch.tensor(3)}, path)
    with pytest.raises(MergeCliError, match="does not fit this model's groups"):
        load_alignment(str(path), spec)


def test_activations_that_overflow_are_a_one_line_error() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(16, 4)
    spec = derive_spec(model, x)
    state = model.state_dict()
    huge = {name: t * 1e25 for name, t in state.items()}  # finite weights, inf activations
    stats = pair_statistics(trace(model), spec, state, huge, [x])
    with pytest.raises(MergeCliError, match="huge: the activations of group '2' are not finite"):
        check_finite(stats, ("reference", "huge"))
    check_finite(pair_statistics(trace(model), spec, state, state, [x]), ("a", "b"))
