"""Applying per-group transforms: a permutation (1-D index) or a general linear map (CCA)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mergecli.align.groups import AxisSlice, PermGroup, PermutationSpec, restrict_to
from mergecli.align.permute import StateDict, apply_permutations
from mergecli.errors import MergeCliError

# group name -> a permutation (int64, 1-D) or a linear map stacked with its inverse (2, n, n)
Transforms = dict[str, Tensor]
BatchNormMapping = Literal["paper", "fold"]


def apply_transforms(
    state_dict: StateDict,
    spec: PermutationSpec,
    transforms: Transforms,
    batchnorm: BatchNormMapping = "paper",
) -> StateDict:
    """Map a model into the reference's basis: its units y become M y (a permutation is one M).

    A linear map passes a BatchNorm as CCA Merge does (``paper``: M on the conv's outputs and
    on the norm's affine and mean), or with the norm's scale folded into the conv first
    (``fold``: M acts on the norm's outputs, where CCA measured the units; see ``fold_norms``).
    """
    spec = restrict_to(spec, state_dict)
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
                    f"group '{group.name}' passes through norm layers whose statistics span "
                    f"units, which only a permutation preserves, but its transform is a linear "
                    f"map ({m.tensor}); give align.from transforms saved for this model (cca "
                    "aligns such groups by permutation)"
                )
        if batchnorm == "fold":
            result = _fold_scales(result, group)
        for m in group.members:
            result[m.tensor] = _map_axis(result[m.tensor], m, _along(m, matrix, inverse_t))
        if batchnorm == "fold":
            result = _unit_gain(result, group)
    return result


def fold_norms(state_dict: StateDict, spec: PermutationSpec, groups: set[str]) -> StateDict:
    """The same function (in eval mode) with every BatchNorm of ``groups`` folded: the conv
    before it takes the scale gamma / sqrt(var + eps), the norm keeps unit gain. The
    reference's basis when the other models were mapped with ``batchnorm: fold``."""
    result = dict(state_dict)
    for group in spec.groups:
        if group.name in groups:
            result = _unit_gain(_fold_scales(result, group), group)
    return result


def _fold_scales(state_dict: StateDict, group: PermGroup) -> StateDict:
    """Multiply each folded BatchNorm's producer rows, running mean (d) and variance (d^2) by
    d = gamma / sqrt(var + eps): the producer now makes the norm's output, less its shift."""
    result = dict(state_dict)
    for norm, members in _folded_norms(group).items():
        weight = state_dict[f"{norm}weight"].double()
        d = weight / (state_dict[f"{norm}running_var"].double() + members[0].eps).sqrt()
        producer = members[0].producer
        for m in group.members:
            if m.role == "out" and m.tensor.startswith(producer) and m.tensor in result:
                result[m.tensor] = _map_axis(result[m.tensor], m, d.diag())
        for m in members:
            if m.tensor.endswith("running_mean"):
                result[m.tensor] = _map_axis(result[m.tensor], m, d.diag())
            elif m.tensor.endswith("running_var"):
                result[m.tensor] = _map_axis(result[m.tensor], m, d.square().diag())
    return result


def _unit_gain(state_dict: StateDict, group: PermGroup) -> StateDict:
    """gamma = sqrt(var + eps): each folded norm passes its input's deviation from the mean
    unscaled, whatever M did to the (estimated) variance, so eval mode gives M y exactly."""
    result = dict(state_dict)
    for norm, members in _folded_norms(group).items():
        var = result[f"{norm}running_var"]
        gain = (var.double() + members[0].eps).sqrt().to(var.dtype)
        result[f"{norm}weight"] = gain.to(result[f"{norm}weight"].dtype)
    return result


def _folded_norms(group: PermGroup) -> dict[str, list[AxisSlice]]:
    """The group's BatchNorms that read one layer's output alone, by tensor prefix."""
    norms: dict[str, list[AxisSlice]] = {}
    for m in group.members:
        if m.role == "unit_norm" and m.producer is not None:
            norms.setdefault(m.tensor.rsplit(".", 1)[0] + ".", []).append(m)
    return norms


def _along(m: AxisSlice, matrix: Tensor, inverse_t: Tensor) -> Tensor:
    """The matrix that multiplies the units of ``m`` when the group's units y become M y."""
    if m.role == "in":
        # The consuming side undoes the map (V -> V M^-1): its axis is multiplied by (M^-1)^T.
        return inverse_t
    if m.role == "unit_norm" and m.tensor.endswith("running_var"):
        # Var((M z)_i) = sum_j M_ij^2 Var(z_j) when the units are uncorrelated: never negative,
        # and exact for a permutation or a positive scaling. (CCA Merge's code maps it by M,
        # which can go negative; reset_bn replaces it either way.)
        return matrix.square()
    # Producers (W -> M W), and a BatchNorm's affine and running mean, as CCA Merge maps them:
    # E[M z] = M E[z] exactly.
    return matrix


def _map_axis(tensor: Tensor, m: AxisSlice, matrix: Tensor) -> Tensor:
    """``matrix`` applied to the units of ``m``; a flattened unit's entries move together."""
    part = tensor.narrow(m.axis, m.offset * m.inner, m.length * m.inner)
    units = part.unflatten(m.axis, (m.length, m.inner)).movedim(m.axis, 0)
    mapped = matrix.to(tensor.device) @ units.reshape(m.length, -1).double()
    mapped = mapped.reshape(units.shape).movedim(0, m.axis).flatten(m.axis, m.axis + 1)
    out = tensor.clone()
    out.narrow(m.axis, m.offset * m.inner, m.length * m.inner).copy_(mapped.to(tensor.dtype))
    return out
