"""Weight matching against Git Re-Basin's algorithm as the paper writes it, same pair, same run.

The reference below (Ainsworth et al., 2023, Algorithm 1 / their `weight_matching.py`) shares
nothing with mergecli but the permutation spec it reads: per group, a dense cost matrix summed
over the group's weights with every other axis permuted, one
`scipy.optimize.linear_sum_assignment` per group per sweep, the groups in a random order each
sweep, until a sweep improves nothing. It visits the groups in the same seeded orders as
mergecli (the same torch generator), so the two should find the same permutations; the script
prints the time ratio, how many groups agree and both objectives (sum of <A, P(B)> over the
matched weights).

With `--spread`, the aligned average's accuracy on MNIST test (2,000 images) of the demo MLP
pair for seeds 0..9, with restarts=1 and with each restarts=N: min / median / max. With
`--recovery NOISE...`, which groups' permutations are found on a trained ResNet-20 against a
permuted copy of itself plus noise: by ours, by the paper's, and by ours with the BatchNorm
running statistics put in the cost as if they were weights.
Run: OMP_NUM_THREADS=1 .venv/bin/python bench/rebasin_reference.py [--repeats 3]
     [--spread --restarts 4 8 16 32] [--recovery 0 0.1 0.3 1] [--skip-compare]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mergecli.align.groups import PermutationSpec
from mergecli.align.permute import apply_permutations, random_permutations
from mergecli.align.spec import derive_spec
from mergecli.align.weight_matching import MatchingStats, weight_matching
from mergecli.data.sources import load_data
from mergecli.io import load_state_dict
from mergecli.models import build_model

Axes = dict[str, list[tuple[str, int]]]  # group -> the (weight, axis) pairs it permutes


def paper_spec(spec: PermutationSpec, shapes: dict[str, tuple[int, ...]]) -> Axes:
    """The spec as Git Re-Basin writes one: whole axes of parameters (no running statistics)."""
    perm_to_axes: Axes = {}
    for group in spec.groups:
        for m in group.members:
            if m.tensor in spec.buffers:
                continue
            assert m.offset == 0 and m.length == shapes[m.tensor][m.axis] and m.inner == 1, m
            perm_to_axes.setdefault(group.name, []).append((m.tensor, m.axis))
    return perm_to_axes


def permuted(perm_to_axes: Axes, perm, name: str, w: np.ndarray, except_axis: int) -> np.ndarray:
    """``w`` with every axis but ``except_axis`` taken in the order of its group's permutation."""
    for group, axes in perm_to_axes.items():
        for tensor, axis in axes:
            if tensor == name and axis != except_axis:
                w = np.take(w, perm[group], axis=axis)
    return w


def rebasin_weight_matching(
    perm_to_axes: Axes, a: dict[str, np.ndarray], b: dict[str, np.ndarray], seed: int
) -> dict[str, np.ndarray]:
    """Git Re-Basin weight matching, dense and in float64, as in the paper's code."""
    names = list(perm_to_axes)
    size = {p: a[axes[0][0]].shape[axes[0][1]] for p, axes in perm_to_axes.items()}
    perm = {p: np.arange(n) for p, n in size.items()}
    generator = torch.Generator().manual_seed(seed)  # the visiting orders mergecli uses
    for _ in range(100):
        progress = False
        for index in torch.randperm(len(names), generator=generator).tolist():
            p, n = names[index], size[names[index]]
            cost = np.zeros((n, n))
            for name, axis in perm_to_axes[p]:
                w_a = np.moveaxis(a[name], axis, 0).reshape(n, -1)
                w_b = np.moveaxis(permuted(perm_to_axes, perm, name, b[name], axis), axis, 0)
                cost += w_a @ w_b.reshape(n, -1).T
            rows, cols = linear_sum_assignment(cost, maximize=True)
            old, new = cost[rows, perm[p]].sum(), cost[rows, cols].sum()
            progress = progress or new > old + 1e-12
            perm[p] = cols
        if not progress:
            break
    return perm


def objective(perm_to_axes: Axes, a, b, perm) -> float:
    """sum over the matched weights of <A, P(B)>."""
    names = {name for axes in perm_to_axes.values() for name, _ in axes}
    return float(sum((a[n] * permuted(perm_to_axes, perm, n, b[n], -1)).sum() for n in names))


def compare(label: str, spec: PermutationSpec, a, b, repeats: int, seed: int = 0) -> None:
    shapes = {n: tuple(t.shape) for n, t in a.items()}
    axes = paper_spec(spec, shapes)
    a64 = {n: t.double().numpy() for n, t in a.items()}
    b64 = {n: t.double().numpy() for n, t in b.items()}
    weight_matching(spec, a, b, seed=seed)  # warm-up: first calls allocate, load kernels
    ours_times, paper_times = [], []
    for _ in range(repeats):  # alternating, so that load on the machine hits both alike
        stats = MatchingStats()
        tic = time.perf_counter()
        ours = weight_matching(spec, a, b, seed=seed, stats=stats)
        ours_times.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        paper = rebasin_weight_matching(axes, a64, b64, seed)
        paper_times.append(time.perf_counter() - tic)
    same = sum(np.array_equal(ours[g].numpy(), paper[g]) for g in axes)
    ours_t, paper_t = statistics.median(ours_times), statistics.median(paper_times)
    found = objective(axes, a64, b64, {g: p.numpy() for g, p in ours.items()})
    print(
        f"{label}: {len(axes)} groups, {same}/{len(axes)} permutations equal; objective ours "
        f"{found:.6f} (reported {stats.objectives[0]:.6f}), paper "
        f"{objective(axes, a64, b64, paper):.6f}; time ours {ours_t:.3f} s, paper "
        f"{paper_t:.3f} s: paper / ours = {paper_t / ours_t:.1f}x (median of {repeats})"
    )


def recovery(noises: list[float]) -> None:
    """A trained ResNet-20 against a randomly permuted copy of itself with Gaussian noise of
    ``noise`` x each tensor's std on every floating tensor: groups whose permutation is found."""
    pair = checkpoint_pair("resnet20")
    if pair is None:
        return
    a = pair[0]
    spec = derive_spec(build_model("resnet20", {"in_channels": 1}), torch.zeros(2, 1, 28, 28))
    truth = random_permutations(spec, torch.Generator().manual_seed(1))
    undo = {g: torch.argsort(p) for g, p in truth.items()}
    axes = paper_spec(spec, {n: tuple(t.shape) for n, t in a.items()})
    for noise in noises:
        generator = torch.Generator().manual_seed(2)
        b = {
            k: v + noise * v.std() * torch.randn(v.shape, generator=generator)
            if v.is_floating_point() and v.numel() > 1
            else v
            for k, v in apply_permutations(a, spec, truth).items()
        }
        found = {
            "ours": weight_matching(spec, a, b),
            "with running statistics in the cost": weight_matching(
                replace(spec, buffers=frozenset()), a, b
            ),
            "paper": {
                g: torch.as_tensor(p)
                for g, p in rebasin_weight_matching(
                    axes, *({n: t.double().numpy() for n, t in s.items()} for s in (a, b)), 0
                ).items()
            },
        }
        counts = ", ".join(
            f"{name} {sum(torch.equal(perms[g], undo[g]) for g in undo)}/{len(undo)}"
            for name, perms in found.items()
        )
        print(f"resnet20 x1 trained, permuted copy + noise {noise}: groups recovered: {counts}")


def checkpoint_pair(stem: str) -> tuple[dict, dict] | None:
    paths = [Path(f"runs/{stem}-seed{seed}.safetensors") for seed in (0, 1)]
    if not all(p.exists() for p in paths):
        print(f"{stem}: runs/{stem}-seed{{0,1}}.safetensors not found, skipped")
        return None
    return load_state_dict(str(paths[0])), load_state_dict(str(paths[1]))


def spread(restarts: list[int], seeds: int) -> None:
    """Aligned-average accuracy of the demo MLP pair over seeds, restarts=1 against N."""
    pair = checkpoint_pair("mlp8")
    if pair is None:
        return
    a, b = pair
    model = build_model("mlp", {"hidden": 128, "depth": 8}).eval()
    spec = derive_spec(model, torch.zeros(2, 1, 28, 28))
    test = load_data({"source": "mnist", "split": "test"})
    for n in (1, *restarts):
        accuracies, objectives, seconds = [], [], []
        for seed in range(seeds):
            stats = MatchingStats()
            tic = time.perf_counter()
            perms = weight_matching(spec, a, b, seed=seed, stats=stats, restarts=n)
            seconds.append(time.perf_counter() - tic)
            objectives.append(stats.objectives[stats.best_restart])
            aligned = apply_permutations(b, spec, perms)
            model.load_state_dict({k: (a[k] + aligned[k]) / 2 for k in a})
            with torch.no_grad():
                accuracies.append(float((model(test.x).argmax(1) == test.y).float().mean()))
        print(
            f"mlp8 demo pair, restarts={n}, seeds 0..{seeds - 1}: aligned average accuracy "
            f"min {min(accuracies):.2%} median {statistics.median(accuracies):.2%} max "
            f"{max(accuracies):.2%}; objective min {min(objectives):.3f} max "
            f"{max(objectives):.3f}; {statistics.median(seconds):.2f} s per alignment (median)"
        )
        print(
            "  accuracy (objective) per seed: "
            + ", ".join(f"{x:.2%} ({o:.2f})" for x, o in zip(accuracies, objectives, strict=True))
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spread", action="store_true", help="accuracy over seeds and restarts")
    parser.add_argument("--restarts", type=int, nargs="+", default=[8])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--recovery", type=float, nargs="*", help="noise levels (x tensor std)")
    args = parser.parse_args()
    if not args.skip_compare:
        pair = checkpoint_pair("mlp8")
        if pair is not None:
            model = build_model("mlp", {"hidden": 128, "depth": 8})
            compare("mlp8 demo pair", derive_spec(model, torch.zeros(2, 784)), *pair, args.repeats)
        pair = checkpoint_pair("resnet20")
        if pair is not None:
            model = build_model("resnet20", {"in_channels": 1})
            spec = derive_spec(model, torch.zeros(2, 1, 28, 28))
            compare("resnet20 x1, trained pair", spec, *pair, args.repeats)
        torch.manual_seed(0)
        models = [build_model("resnet20", {"width": 4}) for _ in range(2)]
        spec = derive_spec(models[0], torch.zeros(2, 3, 32, 32))
        a, b = (m.state_dict() for m in models)
        compare("resnet20 x4, random init", spec, a, b, args.repeats)
    if args.recovery:
        recovery(args.recovery)
    if args.spread:
        spread(args.restarts, args.seeds)


if __name__ == "__main__":
    main()
