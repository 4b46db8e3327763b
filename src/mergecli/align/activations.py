"""Activation statistics per permutation group, from one pass of two models over data."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from mergecli.align.groups import PermGroup, PermutationSpec
from mergecli.align.permute import StateDict
from mergecli.align.tracing import trace
from mergecli.errors import MergeCliError
from mergecli.models.forward import TokenBatch, model_arguments
from mergecli.runtime.distributed import World


@dataclass
class PairStatistics:
    """Running sums of a group's activations in models A (x) and B (y), in float64."""

    count: int
    sum_x: Tensor
    sum_y: Tensor
    sum_xx: Tensor
    sum_yy: Tensor
    sum_xy: Tensor
    pending: Tensor | None = field(default=None, repr=False)  # A's batch until B's arrives

    def means(self) -> tuple[Tensor, Tensor]:
        return self.sum_x / self.count, self.sum_y / self.count

    def covariances(self) -> tuple[Tensor, Tensor, Tensor]:
        """Sigma_XX, Sigma_YY, Sigma_XY (population covariances)."""
        mx, my = self.means()
        n = self.count
        return (
            self.sum_xx / n - torch.outer(mx, mx),
            self.sum_yy / n - torch.outer(my, my),
            self.sum_xy / n - torch.outer(mx, my),
        )

    def correlation(self, eps: float = 1e-8) -> Tensor:
        """Pearson correlation of every unit of A with every unit of B."""
        cxx, cyy, cxy = self.covariances()
        std_x = cxx.diagonal().clamp_min(0).sqrt()
        std_y = cyy.diagonal().clamp_min(0).sqrt()
        return cxy / (torch.outer(std_x, std_y) + eps)

    def cross_moment(self) -> Tensor:
        return self.sum_xy / self.count

    def all_reduce_(self, world: World) -> None:
        """Sum every rank's statistics into each rank's (the ranks saw different examples)."""
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum_x.device)
        self.count = int(world.all_reduce_(count)[0])
        for tensor in (self.sum_x, self.sum_y, self.sum_xx, self.sum_yy, self.sum_xy):
            world.all_reduce_(tensor)


def probe_module(graph_module: fx.GraphModule, nodes: list[str]) -> fx.GraphModule:
    """A copy of the traced model that returns the outputs of ``nodes`` instead of its own."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(graph_module.graph, env)
    by_name = {node.name: node for node in graph_module.graph.nodes}
    graph.output(tuple(env[by_name[name]] for name in nodes))
    return fx.GraphModule(graph_module, graph)


@torch.no_grad()
def pair_statistics(
    model: nn.Module,
    spec: PermutationSpec,
    reference: StateDict,
    other: StateDict,
    batches,
) -> dict[str, PairStatistics]:
    """Accumulate per-group activation sums of both models over ``batches`` of inputs.

    ``model`` is the model (or its fx graph). Groups that name a submodule (specs from
    ``torch.export``) are read by hooks on it in the model's own forward; the others from the
    fx graph's nodes. With token batches, padded positions (mask 0) are left out.
    """
    hooked = [g for g in spec.groups if g.activation_module is not None]
    nodes = list(dict.fromkeys(g.activation for g in spec.groups if g.activation_module is None))
    if spec.traced_with == "torch.export":
        nodes = []  # the exported graph is specialised on the example input: hooks only
    probe = model
    if nodes:
        graph_module = model if isinstance(model, fx.GraphModule) else trace(model)
        probe = probe_module(graph_module, nodes)
    probe.eval()
    stats: dict[str, PairStatistics] = {}
    for x in batches:
        args, kwargs = model_arguments(x)
        mask = x.mask if isinstance(x, TokenBatch) else None
        for side, state in enumerate((reference, other)):
            with _hooks(probe, hooked) as captured:
                outputs = torch.func.functional_call(probe, state, args, kwargs)
            found = dict(zip(nodes, outputs, strict=True)) if nodes else {}
            for group in spec.groups:
                activation = (
                    captured.get(group.name)
                    if group.activation_module
                    else found.get(group.activation)
                )
                if activation is None:
                    continue
                units = _units_last(activation, group.activation_axis, mask).narrow(
                    1, group.activation_offset, group.size
                )
                _add(stats, group.name, side, units)
    return stats


def _add(stats: dict[str, PairStatistics], name: str, side: int, units: Tensor) -> None:
    """Add A's (side 0) or B's activations; B's sums also the cross products with A's."""
    s = stats.get(name)
    if s is None:
        size = units.shape[1]
        zeros = torch.zeros(size, size, dtype=torch.float64, device=units.device)
        vec = torch.zeros(size, dtype=torch.float64, device=units.device)
        s = stats[name] = PairStatistics(
            0, vec.clone(), vec.clone(), zeros.clone(), zeros.clone(), zeros.clone()
        )
    if side == 0:
        s.pending = units
        s.count += units.shape[0]
        s.sum_x += units.sum(0)
        s.sum_xx += units.T @ units
    else:
        s.sum_y += units.sum(0)
        s.sum_yy += units.T @ units
        s.sum_xy += s.pending.T @ units
        s.pending = None


@contextmanager
def _hooks(module: nn.Module, groups: list[PermGroup]) -> Iterator[dict[str, Tensor]]:
    """Forward hooks that keep each group's submodule input or output while the block runs."""
    captured: dict[str, Tensor] = {}
    handles = []
    for group in groups:
        submodule = module.get_submodule(group.activation_module)

        def keep(tensor: Any, name: str = group.name) -> None:
            if isinstance(tensor, Tensor):
                captured[name] = tensor

        if group.activation_input:
            handles.append(
                submodule.register_forward_pre_hook(
                    lambda _m, args, kwargs, keep=keep: keep(
                        args[0] if args else next(iter(kwargs.values()), None)
                    ),
                    with_kwargs=True,
                )
            )
        else:
            handles.append(
                submodule.register_forward_hook(lambda _m, _args, out, keep=keep: keep(out))
            )
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def check_finite(stats: dict[str, PairStatistics], names: tuple[str, str]) -> None:
    """Refuse statistics of activations that overflowed; ``names`` are models A and B."""
    for group, s in stats.items():
        for name, sums in zip(names, ((s.sum_x, s.sum_xx), (s.sum_y, s.sum_yy)), strict=True):
            if not all(bool(t.isfinite().all()) for t in sums):
                raise MergeCliError(
                    f"{name}: the activations of group '{group}' are not finite (inf or NaN) on "
                    "data.fit; the model overflows on these inputs: check its weights and the "
                    "scale of the data"
                )


def _units_last(activation: Tensor, axis: int, mask: Tensor | None = None) -> Tensor:
    """(samples, units) in float64: conv maps count every position as a sample; token
    positions that the mask pads out are not samples."""
    moved = activation.movedim(axis, -1)
    if mask is not None and tuple(moved.shape[:2]) == tuple(mask.shape) and moved.dim() > 2:
        moved = moved[mask.to(moved.device).bool()]
    return moved.reshape(-1, moved.shape[-1]).double()
