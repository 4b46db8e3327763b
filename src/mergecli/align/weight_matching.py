"""Weight matching (Git Re-Basin, Ainsworth et al., 2023): permute B to match A's weights."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
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
    # Host copies of the permutations score the assignment without waiting on the device.
    perms = {g.name: np.arange(g.size) for g in spec.groups}
    version = dict.fromkeys(perms, 0)
    # Which groups permute which axis of each tensor, so "all other axes" is a short loop.
    on_tensor: dict[str, list[tuple[PermGroup, AxisSlice]]] = {}
    for group in spec.groups:
        for m in group.members:
            on_tensor.setdefault(m.tensor, []).append((group, m))
    # One gather index per permuted (tensor, axis), kept current as permutations change, so
    # permuting a tensor's other axes is one index_select per axis on the device.
    axis_index = {
        (name, axis): torch.arange(b[name].shape[axis], device=device)
        for name, axis in {(name, m.axis) for name, ms in on_tensor.items() for _, m in ms}
    }
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
            shares = []
            for i, m in enumerate(group.members):
                others = [(g, o) for g, o in on_tensor[m.tensor] if o is not m]
                key = tuple(version[g.name] for g, _ in others)
                hit = cache.get((group.name, i))
                if hit is None or hit[0] != key:
                    b_other = b[m.tensor]
                    # Other slices on this member's own axis are cut away by _rows.
                    for axis in {o.axis for _, o in others if o.axis != m.axis}:
                        b_other = b_other.index_select(axis, axis_index[(m.tensor, axis)])
                    hit = (key, a_rows[(group.name, i)] @ _rows(b_other, m).T)
                    cache[(group.name, i)] = hit
                shares.append(hit[1])
            # The copy waits for the device's matmuls, so it is counted outside the LAP time.
            cost = torch.stack(shares).sum(0).cpu().double().numpy()
            tic = time.perf_counter()
            rows, cols = linear_sum_assignment(cost, maximize=True)
            lap_seconds += time.perf_counter() - tic
            best = cost[rows, cols].sum()
            gain = best - cost[rows, perms[group.name]].sum()
            if gain > 1e-9 * max(1.0, abs(best)):
                perms[group.name] = cols
                version[group.name] += 1
                improved += gain
                shifted = torch.as_tensor(cols, device=device)
                for m in group.members:
                    axis_index[(m.tensor, m.axis)][m.offset : m.offset + m.length] = (
                        shifted + m.offset
                    )
        stats.sweeps = sweep + 1
        stats.improvements.append(float(improved))
        if improved == 0.0:
            break
    stats.lap_seconds += lap_seconds
    stats.other_seconds += time.perf_counter() - start - lap_seconds
    return {name: torch.as_tensor(p, dtype=torch.int64) for name, p in perms.items()}


def _rows(tensor: Tensor, m: AxisSlice) -> Tensor:
    """The slice's units as rows: (length, everything else)."""
    part = tensor.narrow(m.axis, m.offset, m.length)
    return part.movedim(m.axis, 0).reshape(m.length, -1)
