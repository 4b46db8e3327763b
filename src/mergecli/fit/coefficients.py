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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Granularity = Literal["parameter", "row", "tensor", "model"]
MergeFn = Callable[[Tensor, Tensor], Tensor]  # (stacked flat parameters, logits per scalar)


@dataclass
class FlatParameters:
    """N models' parameters as rows of one (N, P) buffer, and how to cut a row into tensors
    (``thetas`` None: the layout alone, the models being held sharded, fit/sharded.py)."""

    names: list[str]
    shapes: list[torch.Size]
    thetas: Tensor | None

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

    @classmethod
    def layout(cls, state_dict: Mapping[str, Tensor], names: list[str]) -> FlatParameters:
        """The names and shapes without the buffer."""
        return cls(names, [state_dict[n].shape for n in names], None)

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

    @property
    def rows(self) -> list[int]:
        """Rows per tensor: its length along dim 0 (one for a scalar)."""
        return [rows_of(s) for s in self.shapes]

    def group_index(self, granularity: Granularity) -> Groups | None:
        """What ``expand`` needs for ``granularity``: how many coefficients each tensor has and
        how many scalars each of them covers (None: nothing to expand)."""
        if granularity == "tensor":
            return Groups(tuple([1] * len(self.sizes)), tuple(self.sizes))
        if granularity == "row":
            lengths = tuple(n // r for n, r in zip(self.sizes, self.rows, strict=True))
            return Groups(tuple(self.rows), lengths)
        return None


@dataclass(frozen=True)
class Groups:
    """Per tensor, in order: its coefficients (``counts``) and the consecutive scalars each
    covers (``lengths``): one per tensor of ``size`` scalars, or one per row."""

    counts: tuple[int, ...]
    lengths: tuple[int, ...]


class _ExpandGroups(torch.autograd.Function):
    """Per-group logits (..., G) -> per-scalar (..., P), each written as a broadcast into its
    slice of the output; the backward sums each group's gradient. No index the size of the
    model is built or kept (an int64 one would be 8 bytes per parameter for the whole fit)."""

    @staticmethod
    def forward(logits: Tensor, groups: Groups) -> Tensor:
        lead = logits.shape[:-1]
        total = sum(c * n for c, n in zip(groups.counts, groups.lengths, strict=True))
        out = logits.new_empty(*lead, total)
        pieces = out.split([c * n for c, n in zip(groups.counts, groups.lengths, strict=True)], -1)
        parts = logits.split(list(groups.counts), -1)
        for piece, part, count, length in zip(
            pieces, parts, groups.counts, groups.lengths, strict=True
        ):
            piece.view(*lead, count, length).copy_(part.unsqueeze(-1))
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.groups = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):
        groups = ctx.groups
        lead = grad.shape[:-1]
        pieces = grad.split([c * n for c, n in zip(groups.counts, groups.lengths, strict=True)], -1)
        sums = [
            piece.reshape(*lead, count, length).sum(-1)
            for piece, count, length in zip(pieces, groups.counts, groups.lengths, strict=True)
        ]
        return torch.cat(sums, dim=-1), None


def rows_of(shape: torch.Size) -> int:
    """A tensor's rows at granularity ``row``: its length along dim 0, one for a scalar. A 1-D
    tensor (bias, norm scale) has one row per element: each element is one unit's own."""
    return shape[0] if len(shape) else 1


def logits_per_model(granularity: Granularity, flat: FlatParameters) -> int:
    """How many coefficients each model gets."""
    counts = {
        "parameter": lambda: sum(flat.sizes),
        "row": lambda: sum(flat.rows),
        "tensor": lambda: len(flat.names),
        "model": lambda: 1,
    }
    return counts[granularity]()


def expand(logits: Tensor, granularity: Granularity, groups: Groups | None) -> Tensor:
    """Logits per scalar parameter (the last axis), from per-parameter/-row/-tensor/-model
    logits (``groups``: ``FlatParameters.group_index``)."""
    if granularity in ("tensor", "row"):
        return _ExpandGroups.apply(logits, groups)
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
    delta = 0 is the start merge exactly. The result comes in the stack's dtype: bf16 weights
    on CUDA, which the bf16 forward would round them to anyway, at half the memory."""
    return (thetas[0] + (deltas * thetas[1:]).sum(dim=0)).to(thetas.dtype)


def task_vector_merge_by_tensor(
    flat: FlatParameters, deltas: Tensor, granularity: Granularity
) -> dict[str, Tensor]:
    """``task_vector_merge`` tensor by tensor, each model's per-row, per-tensor or per-model
    delta broadcast over its scalars rather than expanded to them: the temporaries are one
    tensor's N copies at a time instead of N x P floats (what lets a 7B model fit a GPU)."""
    merged = {}
    rows = flat.rows
    offset, row_offset = 0, 0
    for i, (name, shape) in enumerate(zip(flat.names, flat.shapes, strict=True)):
        size = shape.numel()
        part = flat.thetas[:, offset : offset + size]
        if granularity == "row":
            d = deltas[:, row_offset : row_offset + rows[i]].unsqueeze(-1)  # (N, rows, 1)
            part = part.reshape(len(part), rows[i], -1)
        else:
            d = deltas[:, i : i + 1] if granularity == "tensor" else deltas  # (N, 1)
        merged[name] = (part[0] + (d * part[1:]).sum(dim=0)).reshape(shape).to(part.dtype)
        offset, row_offset = offset + size, row_offset + rows[i]
    return merged


def merged_weights(
    flat: FlatParameters,
    merge: MergeFn,
    logits: Tensor,
    granularity: Granularity,
    groups: Groups | None,
) -> dict[str, Tensor]:
    """The merged parameters by name: tensor by tensor over task vectors at a coarser
    granularity than ``parameter``, else in one fused pass over the flat buffers."""
    if merge is task_vector_merge and granularity != "parameter":
        return task_vector_merge_by_tensor(flat, logits, granularity)
    return flat.views(merge(flat.thetas, expand(logits, granularity, groups)))


def coefficient_values(logits: Tensor, multi: Literal["pairwise", "joint"]) -> Tensor:
    """The merge weights the logits stand for: the reference's weight, or one row per model."""
    return torch.sigmoid(logits) if multi == "pairwise" else torch.softmax(logits, dim=0)


def logit(p: float) -> float:
    """Inverse of the sigmoid."""
    return float(torch.logit(torch.tensor(p, dtype=torch.float64)))
