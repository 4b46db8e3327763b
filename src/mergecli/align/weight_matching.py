"""Weight matching (Git Re-Basin, Ainsworth et al., 2023): permute B to match A's weights."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from mergecli.align.permute import Permutations, StateDict
from mergecli.align.spec import AxisSlice, PermGroup, PermutationSpec


@dataclass
class MatchingStats:
    """Where weight matching spent its time, and how it converged."""

    sweeps: int = 0
    lap_seconds: float = 0.0
    other_seconds: float = 0.0
    improvements: list[float] = field(default_factory=list)


def weight_matching(
    spec: PermutationSpec,
    reference: StateDict,
    other: StateDict,
    max_iter: int = 100,
    seed: int = 0,
    device: torch.device | str = "cpu",
    stats: MatchingStats | None = None,
) -> Permutations:
    """Coordinate descent over groups: for each, solve the LAP of sum_members A_m (P B_m)^T.

    Every sweep visits the groups in a seeded random order, holding the other groups'
    permutations fixed; it stops when a sweep improves nothing or after ``max_iter`` sweeps.
    """
    stats = stats if stats is not None else MatchingStats()
    start = time.perf_counter()
    # float32 matmuls (the cost), float64 sums for the assignment's score.
    a = {name: reference[name].to(device, torch.float32) for name in spec.tensors()}
    b = {name: other[name].to(device, torch.float32) for name in spec.tensors()}
    perms = {g.name: torch.arange(g.size, device=device) for g in spec.groups}
    version = dict.fromkeys(perms, 0)
    # Which groups permute which axis of each tensor, so "all other axes" is a short loop.
    on_tensor: dict[str, list[tuple[PermGroup, AxisSlice]]] = {}
    for group in spec.groups:
        for m in group.members:
            on_tensor.setdefault(m.tensor, []).append((group, m))
    a_rows = {
        (g.name, i): _rows(a[m.tensor], m) for g in spec.groups for i, m in enumerate(g.members)
    }
    # A member's share of its group's cost changes only when a group on its other axes changes.
    cache: dict[tuple[str, int], tuple[tuple[int, ...], torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(seed)
    lap_seconds = 0.0
    for sweep in range(max_iter):
        improved = 0.0
        for index in torch.randperm(len(spec.groups), generator=generator).tolist():
            group = spec.groups[index]
            cost = torch.zeros(group.size, group.size, dtype=torch.float32, device=device)
            for i, m in enumerate(group.members):
                others = on_tensor[m.tensor]
                key = tuple(version[g.name] for g, other_m in others if other_m is not m)
                hit = cache.get((group.name, i))
                if hit is None or hit[0] != key:
                    b_other = _permute_other_axes(b[m.tensor], m, others, perms)
                    hit = (key, a_rows[(group.name, i)] @ _rows(b_other, m).T)
                    cache[(group.name, i)] = hit
                cost += hit[1]
            tic = time.perf_counter()
            cost_cpu = cost.double().cpu().numpy()
            rows, cols = linear_sum_assignment(cost_cpu, maximize=True)
            lap_seconds += time.perf_counter() - tic
            old = perms[group.name].cpu().numpy()
            best = cost_cpu[rows, cols].sum()
            gain = best - cost_cpu[rows, old].sum()
            if gain > 1e-9 * max(1.0, abs(best)):
                perms[group.name] = torch.as_tensor(cols, device=device)
                version[group.name] += 1
                improved += gain
        stats.sweeps = sweep + 1
        stats.improvements.append(float(improved))
        if improved == 0.0:
            break
    stats.lap_seconds += lap_seconds
    stats.other_seconds += time.perf_counter() - start - lap_seconds
    return {name: p.cpu() for name, p in perms.items()}


def _rows(tensor: Tensor, m: AxisSlice) -> Tensor:
    """The slice's units as rows: (length, everything else)."""
    part = tensor.narrow(m.axis, m.offset, m.length)
    return part.movedim(m.axis, 0).reshape(m.length, -1)


def _permute_other_axes(
    tensor: Tensor,
    current: AxisSlice,
    groups: list[tuple[PermGroup, AxisSlice]],
    perms: Permutations,
) -> Tensor:
    """Apply the current permutations of every other group (and other slices) on this tensor."""
    for group, m in groups:
        if m is current:
            continue
        index = torch.arange(tensor.shape[m.axis], device=tensor.device)
        index[m.offset : m.offset + m.length] = m.offset + perms[group.name]
        tensor = tensor.index_select(m.axis, index)
    return tensor
