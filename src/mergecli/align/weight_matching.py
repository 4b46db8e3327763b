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
    a = {name: reference[name].to(device, torch.float64) for name in spec.tensors()}
    b = {name: other[name].to(device, torch.float64) for name in spec.tensors()}
    perms = {g.name: torch.arange(g.size, device=device) for g in spec.groups}
    # Which groups permute which axis of each tensor, so "all other axes" is a short loop.
    on_tensor: dict[str, list[tuple[PermGroup, AxisSlice]]] = {}
    for group in spec.groups:
        for m in group.members:
            on_tensor.setdefault(m.tensor, []).append((group, m))
    generator = torch.Generator().manual_seed(seed)
    lap_seconds = 0.0
    for sweep in range(max_iter):
        improved = 0.0
        for index in torch.randperm(len(spec.groups), generator=generator).tolist():
            group = spec.groups[index]
            cost = torch.zeros(group.size, group.size, dtype=torch.float64, device=device)
            for m in group.members:
                b_other = _permute_other_axes(b[m.tensor], m, on_tensor[m.tensor], perms)
                a_rows = _rows(a[m.tensor], m)
                cost += a_rows @ _rows(b_other, m).T
            tic = time.perf_counter()
            cost_cpu = cost.cpu().numpy()
            rows, cols = linear_sum_assignment(cost_cpu, maximize=True)
            lap_seconds += time.perf_counter() - tic
            old = perms[group.name]
            new = torch.as_tensor(cols, device=device)
            gain = cost_cpu[rows, cols].sum() - cost_cpu[rows, old.cpu().numpy()].sum()
            if gain > 1e-12 * max(1.0, abs(cost_cpu[rows, cols].sum())):
                perms[group.name] = new
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
