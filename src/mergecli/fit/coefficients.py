"""Merged parameters from per-parameter coefficients, over flat contiguous buffers.

Every model's parameters live in one (N, P) buffer and the coefficients' logits in one more, so
building all merged parameters is one fused elementwise pass; the module then sees views of the
merged flat vector through ``torch.func.functional_call``.

The buffer is held in the compute dtype (bf16 on CUDA, float32 on the CPU): it is N copies of
the model, the largest thing a fit holds. Logits, their gradients and the optimizer's moments
stay float32, and the merged parameters come out float32 (float32 coefficients times a bf16
buffer promote to float32).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Granularity = Literal["parameter", "row", "tensor", "model"]


@dataclass
class FlatParameters:
    """N models' parameters as rows of one (N, P) buffer, and how to cut a row into tensors."""

    names: list[str]
    shapes: list[torch.Size]
    thetas: Tensor

    @classmethod
    def stack(
        cls,
        state_dicts: list[Mapping[str, Tensor]],
        names: list[str],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> FlatParameters:
        """Each state dict a row, converted tensor by tensor straight into the buffer: no
        float32 copy of every model beside it."""
        shapes = [state_dicts[0][n].shape for n in names]
        total = sum(s.numel() for s in shapes)
        thetas = torch.empty(len(state_dicts), total, dtype=dtype, device=device)
        for row, sd in zip(thetas, state_dicts, strict=True):
            for name, part in zip(names, row.split([s.numel() for s in shapes]), strict=True):
                part.copy_(sd[name].reshape(-1))
        return cls(names, shapes, thetas)

    @property
    def sizes(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """Name -> tensor views into one flat vector (no copies)."""
        return {
            name: part.view(shape)
            for name, part, shape in zip(
                self.names, flat.split(self.sizes), self.shapes, strict=True
            )
        }

    def tensor_index(self) -> Tensor:
        """For every scalar, the index of the tensor it belongs to (for per-tensor logits)."""
        sizes = torch.tensor(self.sizes, device=self.thetas.device)
        return torch.repeat_interleave(torch.arange(len(self.names), device=sizes.device), sizes)

    @property
    def rows(self) -> list[int]:
        """Rows per tensor: its length along dim 0 (one for a scalar)."""
        return [rows_of(s) for s in self.shapes]

    def row_index(self) -> Tensor:
        """For every scalar, the index of its row among all tensors' rows (for per-row logits):
        a row is one slice along dim 0, the scalars of one output unit."""
        per_row = [size // rows for size, rows in zip(self.sizes, self.rows, strict=True)]
        lengths = torch.tensor(
            [n for n, r in zip(per_row, self.rows, strict=True) for _ in range(r)],
            device=self.thetas.device,
        )
        return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)

    def group_index(self, granularity: Granularity) -> Tensor | None:
        """What ``expand`` needs for ``granularity``: the scalar-to-group index, or None."""
        if granularity == "tensor":
            return self.tensor_index()
        if granularity == "row":
            return self.row_index()
        return None


def rows_of(shape: torch.Size) -> int:
    """A tensor's rows at granularity ``row``: its length along dim 0, one for a scalar. A 1-D
    tensor (bias, norm scale) has one row per element: each element is one unit's own."""
    return shape[0] if len(shape) else 1


def logits_per_model(granularity: Granularity, flat: FlatParameters) -> int:
    """How many coefficients each model gets."""
    counts = {
        "parameter": lambda: flat.thetas.shape[1],
        "row": lambda: sum(flat.rows),
        "tensor": lambda: len(flat.names),
        "model": lambda: 1,
    }
    return counts[granularity]()


def expand(logits: Tensor, granularity: Granularity, group_index: Tensor | None) -> Tensor:
    """Logits per scalar parameter (the last axis), from per-parameter/-row/-tensor/-model
    logits (``group_index``: ``FlatParameters.group_index``)."""
    if granularity in ("tensor", "row"):
        return logits.index_select(-1, group_index)
    return logits  # per parameter already, or (…, 1) which broadcasts


def pairwise_merge(thetas: Tensor, logits: Tensor) -> Tensor:
    """NP Merge (Orozco Camacho et al., 2024): s(a) * theta_ref + (1 - s(a)) * theta_other."""
    weight = torch.sigmoid(logits)
    if thetas.dtype != weight.dtype:  # lerp takes one dtype: the pair in float32, P each
        return torch.lerp(thetas[1].to(weight.dtype), thetas[0].to(weight.dtype), weight)
    return torch.lerp(thetas[1], thetas[0], weight)


def joint_merge(thetas: Tensor, logits: Tensor) -> Tensor:
    """One softmax over N models per parameter: sum_i softmax(a)_i * theta_i."""
    return (torch.softmax(logits, dim=0) * thetas).sum(dim=0)


def task_vector_merge(thetas: Tensor, deltas: Tensor) -> Tensor:
    """Learned coefficients over task vectors (AdaMerging, Yang et al., 2024, per parameter):
    start + sum_i delta_i * tau_i, with ``thetas`` = [start, tau_1, ..., tau_N] and
    start = base + sum_i c0_i * tau_i, so the coefficients are c_i = c0_i + delta_i and
    delta = 0 is the start merge exactly."""
    return thetas[0] + (deltas * thetas[1:]).sum(dim=0)


def coefficient_values(logits: Tensor, multi: Literal["pairwise", "joint"]) -> Tensor:
    """The merge weights the logits stand for: the reference's weight, or one row per model."""
    return torch.sigmoid(logits) if multi == "pairwise" else torch.softmax(logits, dim=0)


def logit(p: float) -> float:
    """Inverse of the sigmoid."""
    return float(torch.logit(torch.tensor(p, dtype=torch.float64)))
