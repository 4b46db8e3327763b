"""Weight matching (Git Re-Basin) on BatchNorm networks, and its seeded restarts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mergecli.align.permute import apply_permutations, random_permutations
from mergecli.align.spec import derive_spec
from mergecli.align.weight_matching import MatchingStats, weight_matching
from mergecli.models import build_model

BN_MODELS = {
    "resnet20": (lambda: build_model("resnet20", {"in_channels": 1}), (1, 28, 28)),
    "mlp-bn": (lambda: build_model("mlp", {"depth": 4, "hidden": 32, "batchnorm": True}), (784,)),
}


def trained_like(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The model's weights with BatchNorm scales, shifts and running statistics as training
    leaves them (unit-to-unit different), instead of the constant 1s and 0s of an init."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            state[f"{name}.weight"] = 1 + 0.2 * torch.randn(n, generator=generator)
            state[f"{name}.bias"] = 0.1 * torch.randn(n, generator=generator)
            state[f"{name}.running_mean"] = torch.randn(n, generator=generator)
            state[f"{name}.running_var"] = torch.randn(n, generator=generator).exp()
    return state


def noisy_permuted_copy(name: str, noise: float):
    """A BN model's spec and weights A, and B = A with every group permuted at random, noise
    ``noise`` x each tensor's std added to its weights, and running statistics of its own
    (another model's are measured on other activations); and the permutation that undoes it."""
    factory, shape = BN_MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    spec = derive_spec(model, torch.randn(2, *shape))
    generator = torch.Generator().manual_seed(1)
    a = trained_like(model, generator)
    truth = random_permutations(spec, generator)
    b = apply_permutations(a, spec, truth)
    parameters = dict(model.named_parameters())
    for key, tensor in b.items():
        if key in parameters:
            b[key] = tensor + noise * tensor.std() * torch.randn(tensor.shape, generator=generator)
    b.update(trained_like(model, generator) | {k: v for k, v in b.items() if k in parameters})
    undo = {group: torch.argsort(p) for group, p in truth.items()}
    return model, spec, a, b, undo


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("name", list(BN_MODELS))
def test_recovers_the_permutation_of_a_noisy_bn_copy(name: str, noise: float) -> None:
    _, spec, a, b, undo = noisy_permuted_copy(name, noise)
    assert spec.buffers and all("running" in n for n in spec.buffers), spec.buffers
    found = weight_matching(spec, a, b)
    wrong = [g for g in undo if not torch.equal(found[g], undo[g])]
    assert not wrong, f"{len(wrong)} of {len(undo)} groups not recovered: {wrong}"


def test_running_statistics_are_not_matched() -> None:
    # The same copy, matched as if its running statistics were weights (every member in the
    # cost, which Git Re-Basin does not do): a second model's statistics mislead the assignment.
    _, spec, a, b, undo = noisy_permuted_copy("resnet20", 0.5)
    with_statistics = weight_matching(replace(spec, buffers=frozenset()), a, b)
    assert any(not torch.equal(with_statistics[g], undo[g]) for g in undo)
    found = weight_matching(spec, a, b)
    assert all(torch.equal(found[g], undo[g]) for g in undo)


def inner_product(model: torch.nn.Module, spec, a, b, perms) -> float:
    """sum over the parameters the spec permutes of <A, P(B)>, each axis gathered by hand."""
    parameters = dict(model.named_parameters())
    total = 0.0
    for name in parameters:
        slices = [(g, m) for g in spec.groups for m in g.members if m.tensor == name]
        if not slices:
            continue
        permuted = b[name].double()
        for group, member in slices:
            assert (member.offset, member.length) == (0, b[name].shape[member.axis])
            permuted = permuted.index_select(member.axis, perms[group.name])
        total += float((a[name].double() * permuted).sum())
    return total


def test_restarts_keep_the_best_objective_which_is_the_weights_inner_product() -> None:
    torch.manual_seed(0)
    args = {"in_features": 32, "depth": 6, "hidden": 16}
    model_a, model_b = (build_model("mlp", args) for _ in range(2))
    spec = derive_spec(model_a, torch.randn(2, 32))
    a, b = model_a.state_dict(), model_b.state_dict()
    one, several = MatchingStats(), MatchingStats()
    single = weight_matching(spec, a, b, seed=1, stats=one)
    best = weight_matching(spec, a, b, seed=1, stats=several, restarts=6)
    # The first restart is restarts=1's run; a later one finds a larger objective here.
    assert one.objectives == several.objectives[:1]
    assert several.objectives[several.best_restart] == max(several.objectives)
    assert max(several.objectives) > several.objectives[0]
    assert several.best_restart > 0
    for stats, perms in ((one, single), (several, best)):
        expected = inner_product(model_a, spec, a, b, perms)
        assert stats.objectives[stats.best_restart] == pytest.approx(expected, rel=1e-12)
    # Same seed, same result; another seed visits in other orders.
    again = MatchingStats()
    repeat = weight_matching(spec, a, b, seed=1, stats=again, restarts=6)
    assert again.objectives == several.objectives
    assert all(torch.equal(repeat[g], best[g]) for g in best)
    other = MatchingStats()
    weight_matching(spec, a, b, seed=2, stats=other, restarts=6)
    assert other.objectives != several.objectives


def test_objective_leaves_out_running_statistics() -> None:
    model, spec, a, b, _ = noisy_permuted_copy("resnet20", 0.5)
    stats = MatchingStats()
    perms = weight_matching(spec, a, b, stats=stats)
    expected = inner_product(model, spec, a, b, perms)
    assert stats.objectives == [pytest.approx(expected, rel=1e-12)]


def test_restarts_below_one_are_refused() -> None:
    _, spec, a, b, _ = noisy_permuted_copy("mlp-bn", 0.0)
    with pytest.raises(ValueError, match="restarts must be at least 1"):
        weight_matching(spec, a, b, restarts=0)
