"""Activation statistics per permutation group, from one pass of two models over data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor

from mergecli.align.groups import PermutationSpec
from mergecli.align.permute import StateDict
from mergecli.errors import MergeCliError
from mergecli.models.forward import model_arguments
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
    graph_module: fx.GraphModule,
    spec: PermutationSpec,
    reference: StateDict,
    other: StateDict,
    batches,
) -> dict[str, PairStatistics]:
    """Accumulate per-group activation sums of both models over ``batches`` of inputs."""
    nodes = list(dict.fromkeys(g.activation for g in spec.groups))
    probe = probe_module(graph_module, nodes).eval()
    stats: dict[str, PairStatistics] = {}
    for x in batches:
        args, kwargs = model_arguments(x)
        outputs_a = dict(
            zip(nodes, torch.func.functional_call(probe, reference, args, kwargs), strict=True)
        )
        outputs_b = dict(
            zip(nodes, torch.func.functional_call(probe, other, args, kwargs), strict=True)
        )
        for group in spec.groups:
            a, b = (
                _units_last(out[group.activation], group.activation_axis).narrow(
                    1, group.activation_offset, group.size
                )
                for out in (outputs_a, outputs_b)
            )
            s = stats.get(group.name)
            if s is None:
                zeros = torch.zeros(group.size, group.size, dtype=torch.float64, device=a.device)
                vec = torch.zeros(group.size, dtype=torch.float64, device=a.device)
                s = stats[group.name] = PairStatistics(
                    0, vec.clone(), vec.clone(), zeros.clone(), zeros.clone(), zeros.clone()
                )
            s.count += a.shape[0]
            s.sum_x += a.sum(0)
            s.sum_y += b.sum(0)
            s.sum_xx += a.T @ a
            s.sum_yy += b.T @ b
            s.sum_xy += a.T @ b
    return stats


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


def _units_last(activation: Tensor, axis: int) -> Tensor:
    """(samples, units) in float64: conv maps count every position as a sample."""
    moved = activation.movedim(axis, -1)
    return moved.reshape(-1, moved.shape[-1]).double()
