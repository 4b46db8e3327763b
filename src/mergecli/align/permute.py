"""Applying permutations to state dicts, and the check that a spec preserves the function."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from mergecli.align.groups import PermutationSpec
from mergecli.align.heads import random_heads
from mergecli.errors import MergeCliError
from mergecli.models.forward import logits_from
from mergecli.models.loading import tied_names

StateDict = dict[str, Tensor]
Permutations = dict[str, Tensor]  # group name -> LongTensor p: new unit i is old unit p[i]


def axis_indices(spec: PermutationSpec, perms: Permutations, shapes: dict[str, torch.Size]):
    """For every permuted tensor, the index to gather along each of its permuted axes."""
    indices: dict[str, dict[int, Tensor]] = {}
    for group in spec.groups:
        perm = perms.get(group.name)
        if perm is None:
            continue
        for m in group.members:
            if m.tensor not in shapes:
                continue  # a tied parameter's other name, which this state dict leaves out
            axes = indices.setdefault(m.tensor, {})
            if m.axis not in axes:
                axes[m.axis] = torch.arange(shapes[m.tensor][m.axis], device=perm.device)
            # Unit u covers entries [u * inner, (u + 1) * inner): its whole run moves.
            runs = (m.offset + perm)[:, None] * m.inner + torch.arange(m.inner, device=perm.device)
            start = m.offset * m.inner
            axes[m.axis][start : start + m.length * m.inner] = runs.reshape(-1)
    return indices


def apply_permutations(
    state_dict: StateDict, spec: PermutationSpec, perms: Permutations
) -> StateDict:
    """A new state dict with every group's units reordered by its permutation."""
    shapes = {name: t.shape for name, t in state_dict.items()}
    permuted = dict(state_dict)
    for name, axes in axis_indices(spec, perms, shapes).items():
        tensor = state_dict[name]
        for axis, index in axes.items():
            tensor = tensor.index_select(axis, index.to(tensor.device))
        permuted[name] = tensor
    return permuted


def random_permutations(spec: PermutationSpec, generator: torch.Generator) -> Permutations:
    """A random permutation of every group; an attention layer's four groups are one
    permutation of its heads and their dimensions (``align.heads``)."""
    heads = spec.attention_of()
    perms: Permutations = {}
    for group in spec.groups:
        attention = heads.get(group.name)
        if attention is None:
            perms[group.name] = torch.randperm(group.size, generator=generator)
        elif group.name == attention.query:
            perms.update(random_heads(attention, generator))
    return perms


def check_spec(module: nn.Module, spec: PermutationSpec, example_input: Tensor) -> None:
    """Permuting every group at random must leave the outputs unchanged (float64, rel < 1e-5)."""
    probe = copy.deepcopy(module).double().eval()
    generator = torch.Generator().manual_seed(0)
    state = _distinct_values(probe.state_dict(), generator)
    for group in {tuple(names) for names in tied_names(probe).values()}:
        for alias in group[1:]:  # one name per tied parameter: functional_call ties the rest
            state.pop(alias, None)
    x = example_input.double() if example_input.is_floating_point() else example_input  # ids

    def output(sd: StateDict) -> Tensor:
        return logits_from(torch.func.functional_call(probe, sd, (x,)))

    reference = output(state)
    scale = reference.norm().clamp_min(1e-12)

    def error(perms: Permutations) -> float:
        return ((output(apply_permutations(state, spec, perms)) - reference).norm() / scale).item()

    if error(random_permutations(spec, generator)) < 1e-5:
        return
    heads = spec.attention_of()
    for group in spec.groups:
        attention = heads.get(group.name)
        if attention is None:
            single = {group.name: torch.randperm(group.size, generator=generator)}
        elif group.name == attention.query:
            single = random_heads(attention, generator)
        else:
            continue
        if error(single) >= 1e-5:
            raise MergeCliError(
                f"permutation spec of {type(module).__name__}: permuting group '{group.name}' "
                f"({group.size} units) changes the model's output; its tensors "
                f"{sorted({m.tensor for m in group.members})[:4]} are not all joined correctly "
                "(please report this model)"
            )
    raise MergeCliError(
        f"permutation spec of {type(module).__name__}: permuting all groups together changes "
        "the model's output (please report this model)"
    )


def _distinct_values(state: StateDict, generator: torch.Generator) -> StateDict:
    """Constant tensors (fresh BN statistics, zero biases) would hide a wrong join: randomise."""
    varied = {}
    for name, tensor in state.items():
        if (
            tensor.is_floating_point()
            and tensor.numel() > 1
            and bool((tensor == tensor.flatten()[0]).all())
        ):
            noise = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype)
            noise = noise.to(tensor.device)
            tensor = noise + 0.5 if name.endswith("running_var") else noise - 0.5
        varied[name] = tensor
    return varied
