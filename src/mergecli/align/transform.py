"""Applying per-group transforms: a permutation (1-D index) or a general linear map (CCA)."""

from __future__ import annotations

from torch import Tensor

from mergecli.align.groups import AxisSlice, PermutationSpec
from mergecli.align.permute import StateDict, apply_permutations
from mergecli.errors import MergeCliError

# group name -> a permutation (int64, 1-D) or a linear map stacked with its inverse (2, n, n)
Transforms = dict[str, Tensor]


def apply_transforms(
    state_dict: StateDict, spec: PermutationSpec, transforms: Transforms
) -> StateDict:
    """Map a model into the reference's basis: its units y become M y (a permutation is one M)."""
    perms = {name: t for name, t in transforms.items() if t.dim() == 1}
    result = apply_permutations(state_dict, spec, perms)
    for group in spec.groups:
        pair = transforms.get(group.name)
        if pair is None or pair.dim() == 1:
            continue
        matrix, inverse_t = pair[0].double(), pair[1].double().T
        for m in group.members:
            if m.role == "norm":
                raise MergeCliError(
                    f"group '{group.name}' passes through norm layers, which only a permutation "
                    f"preserves, but its transform is a linear map ({m.tensor}); give align.from "
                    "transforms saved for this model (cca aligns such groups by permutation)"
                )
            # The producing side maps units forward (W -> M W); the consuming side undoes it
            # (V -> V M^-1), i.e. its axis is multiplied by (M^-1)^T.
            along = matrix if m.role == "out" else inverse_t
            result[m.tensor] = _map_axis(result[m.tensor], m, along)
    return result


def _map_axis(tensor: Tensor, m: AxisSlice, matrix: Tensor) -> Tensor:
    """``matrix`` applied to the units of ``m``; a flattened unit's entries move together."""
    part = tensor.narrow(m.axis, m.offset * m.inner, m.length * m.inner)
    units = part.unflatten(m.axis, (m.length, m.inner)).movedim(m.axis, 0)
    mapped = matrix.to(tensor.device) @ units.reshape(m.length, -1).double()
    mapped = mapped.reshape(units.shape).movedim(0, m.axis).flatten(m.axis, m.axis + 1)
    out = tensor.clone()
    out.narrow(m.axis, m.offset * m.inner, m.length * m.inner).copy_(mapped.to(tensor.dtype))
    return out
