"""The data-driven merge methods fisher and regmean, against formulas written out here."""

from __future__ import annotations

import torch
from torch import nn

from mergecli.merge.fisher import diagonal_fisher, fisher_merge, normalized
from mergecli.merge.regmean import input_grams, regmean_merge

TOL = 1e-5


def tiny(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in net().state_dict().items()}


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def batches(n: int = 24, size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def loop_fisher(weights, data, kind: str) -> dict[str, torch.Tensor]:
    """The diagonal Fisher one example and one class at a time, with autograd."""
    module = net()
    module.load_state_dict(weights)
    total = {n: torch.zeros_like(p) for n, p in module.named_parameters()}
    count = 0
    for x, y in data:
        for xn, yn in zip(x, y, strict=True):
            log_p = module(xn[None]).log_softmax(-1)[0]
            classes = range(3) if kind == "exact" else [int(yn)]
            for c in classes:
                module.zero_grad()
                log_p[c].backward(retain_graph=True)
                p = log_p[c].exp().item() if kind == "exact" else 1.0
                for n, q in module.named_parameters():
                    total[n] += p * q.grad.square()
            count += 1
    return {n: t / count for n, t in total.items()}


def test_fisher_matches_the_per_example_formula():
    weights = tiny(1)
    for kind in ("exact", "empirical"):
        got = diagonal_fisher(net(), weights, batches(), kind)
        want = loop_fisher(weights, batches(), kind)
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=TOL, rtol=1e-4)


def test_fisher_of_identical_models_returns_them():
    weights = tiny(2)
    fisher = diagonal_fisher(net(), weights, batches())
    merged = fisher_merge([weights, weights], [fisher, fisher], [1.0, 1.0])
    for n, t in weights.items():
        torch.testing.assert_close(merged[n], t, atol=TOL, rtol=0)


def test_fisher_zero_in_one_model_lets_the_other_win():
    a, b = tiny(3), tiny(4)
    b["0.bias"][0] = -100.0  # hidden unit 0 is dead in b: its incoming weights have no gradient
    fishers = [diagonal_fisher(net(), w, batches(), "exact") for w in (a, b)]
    assert fishers[1]["0.weight"][0].abs().max() == 0
    assert fishers[0]["0.weight"][0].min() > 1e-4  # far above the floor
    merged = fisher_merge([a, b], fishers, [1.0, 1.0], floor=1e-8)
    torch.testing.assert_close(merged["0.weight"][0], a["0.weight"][0], atol=1e-3, rtol=0)


def test_fisher_merge_is_the_weighted_formula():
    a, b = tiny(5), tiny(6)
    fa = {n: torch.rand_like(t) for n, t in a.items()}
    fb = {n: torch.rand_like(t) for n, t in a.items()}
    merged = fisher_merge([a, b], [fa, fb], [0.25, 0.75], floor=1e-6)
    for n in a:
        want = (0.25 * fa[n] * a[n] + 0.75 * fb[n] * b[n]) / (0.25 * fa[n] + 0.75 * fb[n])
        torch.testing.assert_close(merged[n], want, atol=TOL, rtol=0)


def test_regmean_with_alpha_1_is_least_squares_on_both_models_inputs():
    a, b = tiny(7), tiny(8)
    data = batches()
    grams = [input_grams(net(), w, data) for w in (a, b)]
    merged = regmean_merge([a, b], grams, [1.0, 1.0], alpha=1.0)
    x = torch.cat([x for x, _ in data]).double()
    for layer in ("0", "2"):
        # Each model's inputs to the layer, and the layer's outputs (without bias) on them.
        inputs = []
        targets = []
        for w in (a, b):
            h = x if layer == "0" else torch.relu(x @ w["0.weight"].double().T + w["0.bias"])
            inputs.append(h)
            targets.append(h @ w[f"{layer}.weight"].double().T)
        solution = torch.linalg.lstsq(torch.cat(inputs), torch.cat(targets)).solution.T
        torch.testing.assert_close(merged[f"{layer}.weight"].double(), solution, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            merged[f"{layer}.bias"], (a[f"{layer}.bias"] + b[f"{layer}.bias"]) / 2
        )


def test_regmean_with_alpha_0_weights_each_input_by_its_energy():
    a, b = tiny(9), tiny(10)
    data = batches()
    grams = [input_grams(net(), w, data) for w in (a, b)]
    merged = regmean_merge([a, b], grams, [1.0, 1.0], alpha=0.0)
    da, db = (g["2.weight"].diagonal().float() for g in grams)
    want = (da * a["2.weight"] + db * b["2.weight"]) / (da + db)
    torch.testing.assert_close(merged["2.weight"], want, atol=TOL, rtol=0)


def test_regmean_of_identical_models_returns_them():
    a = tiny(11)
    grams = input_grams(net(), a, batches())
    merged = regmean_merge([a, a], [grams, grams], [1.0, 1.0], alpha=0.9)
    for n, t in a.items():
        torch.testing.assert_close(merged[n], t, atol=TOL, rtol=0)


def test_sampled_fisher_averages_to_the_exact_one():
    # One input seen 3000 times: the mean over labels drawn from p(y|x) tends to the exact
    # expectation sum_y p(y|x) g_y^2 (about 2% standard error here).
    weights = tiny(12)
    x = torch.randn(1, 4).expand(3000, 4)
    data = [(x[i : i + 500], torch.zeros(500, dtype=torch.long)) for i in range(0, 3000, 500)]
    generator = torch.Generator().manual_seed(0)
    sampled = diagonal_fisher(net(), weights, data, "sampled", generator)
    exact = diagonal_fisher(net(), weights, data[:1], "exact")
    for n in exact:
        assert abs(sampled[n].sum() / exact[n].sum() - 1) < 0.1, n


def test_normalized_fisher_has_unit_norm_and_merges_the_same_for_equal_scales():
    a, b = tiny(13), tiny(14)
    fa = {n: torch.rand_like(t) for n, t in a.items()}
    unit = normalized(fa)
    total = sum(f.double().square().sum() for f in unit.values())
    assert abs(total - 1) < 1e-6
    # Scaling one model's Fisher by c changes its merge weight; normalising undoes that.
    scaled = {n: 7.0 * f for n, f in fa.items()}
    one = fisher_merge([a, b], [normalized(fa), normalized(fa)], [1.0, 1.0], floor=1e-12)
    two = fisher_merge([a, b], [normalized(fa), normalized(scaled)], [1.0, 1.0], floor=1e-12)
    for n in a:
        torch.testing.assert_close(one[n], two[n], atol=TOL, rtol=0)
