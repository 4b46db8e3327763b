"""Weight matching (Git Re-Basin, Ainsworth et al., 2023): permute B to match A's weights."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import reduce
from itertools import groupby

import numpy as np
import torch
from torch import Tensor

from mergecli.align.assignment import linear_sum_assignment
from mergecli.align.groups import (
    AxisSlice,
    PermGroup,
    PermutationSpec,
    restrict_to,
    split_flattened,
    weights_only,
)
from mergecli.align.heads import heads_value, match_heads
from mergecli.align.permute import Permutations, StateDict, apply_permutations

# Which groups permute which slice of each tensor.
Placements = dict[str, list[tuple[PermGroup, AxisSlice]]]


@dataclass
class MatchingStats:
    """Where weight matching spent its time, how it converged, and each restart's objective."""

    sweeps: int = 0  # of the restart kept
    lap_seconds: float = 0.0
    other_seconds: float = 0.0
    setup_seconds: float = 0.0  # part of other_seconds: both models laid out on the device
    improvements: list[float] = field(default_factory=list)  # per sweep, of the restart kept
    objectives: list[float] = field(default_factory=list)  # per restart, in the order run
    best_restart: int = 0


@dataclass
class _Matched:
    """The weights as weight matching sees them: its spec, and both models' tensors."""

    spec: PermutationSpec
    reference: StateDict
    other: StateDict


@dataclass
class _Shift:
    """How one permuted axis moves B's rows: gather[at] += (perm[source] - unit) * stride."""

    at: np.ndarray
    source: np.ndarray  # positions in the flat array of all permutations
    unit: np.ndarray
    stride: np.ndarray


@dataclass
class _Block:
    """Consecutive columns of a group's cost whose product is computed, and cached, as one."""

    columns: slice  # in the group's A_rows, and rows in its B_cols
    neighbours: tuple[str, ...]  # the groups permuting these members' other axes
    shifts: list[_Shift]
    seen: tuple[int, ...] | None = None
    product: Tensor | None = None


@dataclass
class _GroupCost:
    """A group's cost matrix: the sum over blocks of A_rows[:, block] @ B_cols[gather(block)].

    In A_rows every member's units are rows and everything else columns, members side by
    side; B_cols is the same for B, transposed, so that the gather applying the other
    groups' permutations to B moves whole contiguous rows.
    """

    a_rows: Tensor
    b_cols: Tensor
    blocks: list[_Block]
    cost: np.ndarray | None = None


def weight_matching(
    spec: PermutationSpec,
    reference: StateDict,
    other: StateDict,
    max_iter: int = 100,
    seed: int = 0,
    device: torch.device | str = "cpu",
    stats: MatchingStats | None = None,
    restarts: int = 1,
) -> Permutations:
    """Git Re-Basin weight matching: coordinate descent over groups, each a LAP of
    sum_members A_m (P B_m)^T, from ``restarts`` seeded visiting orders; keeps the best.

    Every sweep visits the groups in a random order, holding the other groups' permutations
    fixed; it stops when a sweep improves nothing or after ``max_iter`` sweeps. Each restart
    starts from the identity with its own order (the first is the one ``restarts=1`` runs);
    the permutations kept are those with the largest ``objective``. Buffers (running
    statistics) are permuted by the caller with their groups but are not matched.
    """
    if restarts < 1:
        raise ValueError(f"weight_matching: restarts must be at least 1, not {restarts}")
    stats = stats if stats is not None else MatchingStats()
    start = time.perf_counter()
    # On the CPU the matmuls dominate, so a group's cost is cached block by block; on a GPU
    # launches and copies dominate, so it is one gather and one matmul.
    per_block = torch.device(device).type == "cpu"
    weights = weights_only(restrict_to(spec, reference))
    costs, flat, perms, matched = prepare(weights, reference, other, device, per_block)
    stats.setup_seconds += time.perf_counter() - start
    identity = flat.copy()
    version = dict.fromkeys(perms, 0)
    lap_seconds, best_score, best = 0.0, -math.inf, {}
    for restart in range(restarts):
        flat[:] = identity
        for name in version:  # every cached product is stale
            version[name] += 1
        generator = torch.Generator().manual_seed(restart_seed(seed, restart))
        improvements: list[float] = []
        for _ in range(max_iter):
            improved, seconds = _sweep(weights, costs, flat, perms, version, generator)
            lap_seconds += seconds
            improvements.append(improved)
            if improved == 0.0:
                break
        found = {name: torch.tensor(p, dtype=torch.int64) for name, p in perms.items()}
        # On the device the matrices were copied to, without copying them again.
        score = objective(matched.spec, matched.reference, matched.other, found)
        stats.objectives.append(score)
        if score > best_score:
            best_score, best = score, found
            stats.best_restart, stats.sweeps, stats.improvements = (
                restart,
                len(improvements),
                improvements,
            )
    stats.lap_seconds += lap_seconds
    stats.other_seconds += time.perf_counter() - start - lap_seconds
    return best


def restart_seed(seed: int, restart: int) -> int:
    """The visiting-order seed of one restart: the recipe's seed first, then derived ones."""
    if restart == 0:
        return seed
    sequence = np.random.SeedSequence([seed & (2**64 - 1), restart])
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


def objective(
    spec: PermutationSpec, reference: StateDict, other: StateDict, perms: Permutations
) -> float:
    """sum over the weights ``spec`` permutes of <A, P(B)>, in float64: what matching maximises."""
    weights = weights_only(restrict_to(spec, reference))
    names = sorted(weights.tensors())
    permuted = apply_permutations({n: other[n] for n in names}, weights, perms)
    # Every product is queued before the first float() waits for the device.
    products = [torch.sum(reference[n].double() * permuted[n].double()) for n in names]
    return sum(float(p) for p in products)


def _sweep(
    spec: PermutationSpec,
    costs: dict[str, _GroupCost],
    flat: np.ndarray,
    perms: dict[str, np.ndarray],
    version: dict[str, int],
    generator: torch.Generator,
) -> tuple[float, float]:
    """One pass over the groups in a random order: the total gain, and the seconds in the LAP.

    An attention layer's four groups are one visit: their permutation is one of its heads
    (``align.heads.match_heads``), solved from the four groups' costs together."""
    improved, lap_seconds = 0.0, 0.0
    heads = spec.attention_of()
    for index in torch.randperm(len(spec.groups), generator=generator).tolist():
        group = spec.groups[index]
        attention = heads.get(group.name)
        if attention is not None:
            if group.name != attention.query:
                continue
            tic = time.perf_counter()
            cost = {n: current_cost(costs[n], flat, version) for n in attention.groups}
            found = {n: p.numpy() for n, p in match_heads(attention, cost).items()}
            lap_seconds += time.perf_counter() - tic
            best = heads_value(attention, cost, found)
            gain = best - heads_value(attention, cost, perms)
            if gain > 1e-9 * max(1.0, abs(best)):
                for name in attention.groups:
                    perms[name][:] = found[name]
                    version[name] += 1
                improved += gain
            continue
        cost = current_cost(costs[group.name], flat, version)
        tic = time.perf_counter()
        rows, cols = linear_sum_assignment(cost, maximize=True)
        lap_seconds += time.perf_counter() - tic
        best = cost[rows, cols].sum()
        gain = best - cost[rows, perms[group.name]].sum()
        if gain > 1e-9 * max(1.0, abs(best)):
            perms[group.name][:] = cols
            version[group.name] += 1
            improved += gain
    return float(improved), lap_seconds


def prepare(
    spec: PermutationSpec,
    reference: StateDict,
    other: StateDict,
    device: torch.device | str,
    per_block: bool,
) -> tuple[dict[str, _GroupCost], np.ndarray, dict[str, np.ndarray], _Matched]:
    """Every group's cost layout, identity permutations as views into one flat array, and the
    weights as matched (flattened units split, matrices on the device) for the objective."""
    # A flattened unit's run of entries becomes an axis of its own, so below every member's
    # units are whole rows of one axis.
    spec, views = split_flattened(spec, {name: t.shape for name, t in reference.items()})
    if views:
        reference = {**reference, **{n: reference[n].reshape(v) for n, v in views.items()}}
        other = {**other, **{n: other[n].reshape(v) for n, v in views.items()}}
    placements: Placements = {}
    for group in spec.groups:
        for m in group.members:
            placements.setdefault(m.tensor, []).append((group, m))
    # Tensors with more than one axis go to the device once each, from a background thread
    # while the host plans the layouts; vectors (biases, norms) are stacked on the host.
    names = [name for name in placements if reference[name].dim() > 1]
    with ThreadPoolExecutor(max_workers=1) as pool:
        moving = pool.submit(
            # Asynchronous from pinned memory; the layout copies queue behind it on the stream.
            lambda: [
                {n: state[n].to(device, non_blocking=True) for n in names}
                for state in (reference, other)
            ]
        )
        # One host array holds every permutation, so a block's gather is a few vector ops.
        offsets, total = {}, 0
        for g in spec.groups:
            offsets[g.name], total = total, total + g.size
        flat = np.concatenate([np.arange(g.size) for g in spec.groups] + [np.zeros(0, np.int64)])
        shapes = {name: tuple(reference[name].shape) for name in placements}
        plans = {g.name: _plan(g, shapes, placements, offsets, per_block) for g in spec.groups}
        a, b = moving.result()
    costs = {
        g.name: _lay_out(g, plans[g.name], reference, other, a, b, device) for g in spec.groups
    }
    perms = {g.name: flat[offsets[g.name] : offsets[g.name] + g.size] for g in spec.groups}
    return costs, flat, perms, _Matched(spec, {**reference, **a}, {**other, **b})


def current_cost(entry: _GroupCost, flat: np.ndarray, version: dict[str, int]) -> np.ndarray:
    """The group's cost under the current permutations, recomputing only stale blocks."""
    stale = False
    for block in entry.blocks:
        seen = tuple(version[name] for name in block.neighbours)
        if block.seen == seen:
            continue
        gather = np.arange(block.columns.start, block.columns.stop)
        for shift in block.shifts:
            gather[shift.at] += (flat[shift.source] - shift.unit) * shift.stride
        rows = entry.b_cols.index_select(0, torch.from_numpy(gather).to(entry.b_cols.device))
        block.product = entry.a_rows[:, block.columns] @ rows
        block.seen, stale = seen, True
    if stale or entry.cost is None:
        total = reduce(torch.add, (block.product for block in entry.blocks))
        # The copy waits for the device's matmuls, so it is counted outside the LAP time.
        entry.cost = total.cpu().double().numpy()
    return entry.cost


@dataclass
class _Plan:
    """Where each member of a group goes among its columns, decided on the host."""

    vectors: list[AxisSlice]  # one column each, first
    matrices: list[tuple[AxisSlice, list[int], int]]  # member, its other axes, first column
    blocks: list[_Block]
    width: int


def _plan(
    group: PermGroup,
    shapes: dict[str, tuple[int, ...]],
    placements: Placements,
    offsets: dict[str, int],
    per_block: bool,
) -> _Plan:
    """Order a group's members into blocks, and record how permutations move their columns."""
    # Other slices on the member's own axis are not among its columns.
    neighbours = {
        m: tuple(sorted({g.name for g, o in placements[m.tensor] if o.axis != m.axis}))
        for m in group.members
    }
    vectors = [m for m in group.members if len(shapes[m.tensor]) == 1]
    others = [m for m in group.members if len(shapes[m.tensor]) > 1]
    # Per block, members permuted by the same neighbours; otherwise all in one block.
    others = sorted(others, key=neighbours.get) if per_block else others
    chunks = groupby(others, key=neighbours.get if per_block else lambda m: ())
    blocks = [_Block(slice(0, len(vectors)), (), [])] if vectors and per_block else []
    matrices, start = [], len(vectors)
    for _, chunk in chunks:
        first, names, pieces = start if per_block else 0, set(), []
        for m in chunk:
            rest = [n for axis, n in enumerate(shapes[m.tensor]) if axis != m.axis]
            matrices.append((m, rest, start))
            _add_pieces(pieces, m, rest, start - first, placements, offsets)
            names.update(neighbours[m])
            start += math.prod(rest)
        shifts = [_Shift(*(np.concatenate(part) for part in zip(*p, strict=True))) for p in pieces]
        blocks.append(_Block(slice(first, start), tuple(sorted(names)), shifts))
    if not blocks:  # vectors only, without per-block caching
        blocks = [_Block(slice(0, start), (), [])]
    return _Plan(vectors, matrices, blocks, start)


def _lay_out(
    group: PermGroup,
    plan: _Plan,
    reference: StateDict,
    other: StateDict,
    a: StateDict,
    b: StateDict,
    device: torch.device | str,
) -> _GroupCost:
    """Both models' rows for every member of ``group``, side by side, in float32 on ``device``."""
    # float32 matmuls (the cost); the assignment's scores are summed in float64 on the host.
    a_rows = torch.empty(group.size, plan.width, device=device)
    b_cols = torch.empty(plan.width, group.size, device=device)
    if plan.vectors:
        k = len(plan.vectors)
        a_rows[:, :k].copy_(torch.stack([_vector(reference, m) for m in plan.vectors], dim=1))
        b_cols[:k].copy_(torch.stack([_vector(other, m) for m in plan.vectors], dim=0))
    for m, rest, start in plan.matrices:
        width, shape = math.prod(rest), a[m.tensor].shape
        # (before, units, after): copies out of it are at most 3-d, and a plain 2-d transpose
        # where the units lead, which torch copies blockwise.
        before, after = math.prod(shape[: m.axis]), math.prod(shape[m.axis + 1 :])
        a_part = a[m.tensor].reshape(before, -1, after).narrow(1, m.offset, m.length)
        a_rows[:, start : start + width].view(m.length, before, after).copy_(a_part.transpose(0, 1))
        b_part = b[m.tensor].reshape(before, -1, after).narrow(1, m.offset, m.length)
        b_block = b_cols[start : start + width]
        if before == 1:
            b_block.copy_(b_part[0].T)
        else:
            b_block.view(before, after, m.length).copy_(b_part.transpose(1, 2))
    return _GroupCost(a_rows, b_cols, plan.blocks)


def _vector(state: StateDict, m: AxisSlice) -> Tensor:
    return state[m.tensor].narrow(0, m.offset, m.length).float()


def _add_pieces(
    pieces: list[list[tuple[np.ndarray, ...]]],
    m: AxisSlice,
    rest: list[int],
    at: int,
    placements: Placements,
    offsets: dict[str, int],
) -> None:
    """Record where each permuted other axis of ``m`` moves its columns, one list per axis.

    Slices of one axis are disjoint, so within a list every column appears at most once.
    """
    axes = [axis for axis in range(len(rest) + 1) if axis != m.axis]
    strides = np.cumprod([1, *rest[:0:-1]])[::-1]  # row-major strides of the other axes
    column = np.arange(math.prod(rest))
    by_axis: dict[int, list[tuple[PermGroup, AxisSlice]]] = {}
    for g, o in placements[m.tensor]:
        if o.axis != m.axis:
            by_axis.setdefault(o.axis, []).append((g, o))
    moved = sorted(by_axis)
    while len(pieces) < len(moved):
        pieces.append([])
    for axis, slices in by_axis.items():
        j = axes.index(axis)
        coordinate = column // strides[j] % rest[j]
        # Which slice each column's coordinate falls in, for all of the axis's slices at once
        # (GroupNorm groups cut an axis into many).
        slices = sorted(slices, key=lambda placed: placed[1].offset)
        starts = np.array([o.offset for _, o in slices])
        ends = starts + np.array([o.length for _, o in slices])
        first = np.array([offsets[g.name] for g, _ in slices])
        which = np.searchsorted(starts, coordinate, side="right") - 1
        inside = np.flatnonzero((which >= 0) & (coordinate < ends[which.clip(0)]))
        which = which[inside]
        unit = coordinate[inside] - starts[which]
        stride = np.full(inside.size, strides[j])
        pieces[moved.index(axis)].append((inside + at, unit + first[which], unit, stride))
