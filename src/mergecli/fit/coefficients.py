"""Merged parameters from per-parameter coefficients, over flat contiguous buffers.

Every model's parameters live in one (N, P) buffer and the coefficients' logits in one more, so
building all merged parameters is one fused elementwise pass; the module then sees views of the
merged flat vector through ``torch.func.functional_call``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Granularity = Literal["parameter", "tensor", "model"]


@dataclass
class FlatParameters:
    """N models' parameters as rows of one (N, P) buffer, and how to cut a row into tensors."""

    names: list[str]
    shapes: list[torch.Size]
    thetas: Tensor

    @classmethod
    def stack(
        cls, state_dicts: list[dict[str, Tensor]], names: list[str], device: torch.device
    ) -> FlatParameters:
        shapes = [state_dicts[0][n].shape for n in names]
        thetas = torch.stack(
            [torch.cat([sd[n].reshape(-1).float() for n in names]) for sd in state_dicts]
        ).to(device)
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


def logits_per_model(granularity: Granularity, flat: FlatParameters) -> int:
    """How many coefficients each model gets."""
    return {"parameter": flat.thetas.shape[1], "tensor": len(flat.names), "model": 1}[granularity]


def expand(logits: Tensor, granularity: Granularity, tensor_index: Tensor | None) -> Tensor:
    """Logits per scalar parameter (the last axis), from per-parameter/-tensor/-model logits."""
    if granularity == "tensor":
        return logits.index_select(-1, tensor_index)
    return logits  # per parameter already, or (…, 1) which broadcasts


def pairwise_merge(thetas: Tensor, logits: Tensor) -> Tensor:
    """NP Merge (Orozco Camacho et al., 2024): s(a) * theta_ref + (1 - s(a)) * theta_other."""
    return torch.lerp(thetas[1], thetas[0], torch.sigmoid(logits))


def joint_merge(thetas: Tensor, logits: Tensor) -> Tensor:
    """One softmax over N models per parameter: sum_i softmax(a)_i * theta_i."""
    return (torch.softmax(logits, dim=0) * thetas).sum(dim=0)


def coefficient_values(logits: Tensor, multi: Literal["pairwise", "joint"]) -> Tensor:
    """The merge weights the logits stand for: the reference's weight, or one row per model."""
    return torch.sigmoid(logits) if multi == "pairwise" else torch.softmax(logits, dim=0)


def logit(p: float) -> float:
    """Inverse of the sigmoid."""
    return float(torch.logit(torch.tensor(p, dtype=torch.float64)))
