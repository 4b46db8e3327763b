"""Permutation specs: which weight axes share one permutation of hidden units.

A spec is a list of groups; each names the slices of tensor axes that index the same units,
and the graph node whose output carries them (for matching on activations). ``align.spec``
derives one from a model's graph; the matching methods and ``permute`` read it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from mergecli.errors import MergeCliError

Role = Literal["out", "in", "norm", "unit_norm"]


@dataclass(frozen=True)
class AxisSlice:
    """``length`` units of ``tensor`` along ``axis`` starting at ``offset``.

    ``role`` says how a general linear map M (CCA) acts there: ``out`` produces the units
    (W -> M W), ``in`` consumes them (W -> W M^-1); ``unit_norm`` is a parameter or running
    statistic of a norm whose statistics are each unit's own (BatchNorm, InstanceNorm), which
    M maps as CCA Merge does (mean and affine M v, variance (M∘M) v) until the statistics are
    recomputed; ``norm`` scales units one by one with statistics across units or no statistics
    at all (LayerNorm, GroupNorm, PReLU, depthwise conv), which only a permutation passes.
    Each unit spans ``inner`` consecutive entries of the axis (a channel flattened together
    with the positions after it, as a classifier after a conv stack sees it); ``offset`` and
    ``length`` count units, so the slice covers entries [offset * inner, (offset + length) *
    inner). A BatchNorm's members name the layer whose output only it reads (``producer``, a
    tensor prefix such as ``layer1.0.conv1.``) and its ``eps``, so that CCA can fold the norm's
    scale into that layer before mapping.
    """

    tensor: str
    axis: int
    offset: int
    length: int
    role: Role
    inner: int = 1
    producer: str | None = None
    eps: float | None = None


@dataclass(frozen=True)
class PermGroup:
    """One set of hidden units that share a permutation, with every axis slice it touches."""

    name: str
    size: int
    members: tuple[AxisSlice, ...]
    activation: str  # the graph node whose output carries these units (for activation matching)
    activation_axis: int
    activation_offset: int = 0  # where the units start on that axis (a chunk of a larger layer)
    # Specs from an exported graph name a submodule instead, whose input (or output) carries
    # the units: its hooks read them in the model's own forward, at any batch shape and with
    # the attention mask, which the graph (specialised on the example input) could not take.
    activation_module: str | None = None
    activation_input: bool = False


@dataclass(frozen=True)
class AttentionSpec:
    """One attention layer whose heads are units: the four groups its permutation moves together.

    ``query`` and ``output`` have ``heads`` heads, ``key`` and ``value`` ``kv_heads`` (fewer with
    grouped-query attention: query heads ``g * heads // kv_heads ...`` read key/value head g).
    A permutation of key/value heads moves their query heads with them; the query heads of one
    key/value head may also trade places; within a head, query and key dimensions move together
    (unless ``qk_dims_fixed``: rotary embeddings rotate each dimension pair at its own
    frequency, so no dimension may move), value dimensions with the output projection's columns.
    The four groups' permutations are therefore never independent: ``align.heads`` builds them.
    """

    name: str
    query: str
    key: str
    value: str
    output: str
    heads: int
    kv_heads: int
    qk_dims: int
    v_dims: int
    qk_dims_fixed: bool = False

    @property
    def groups(self) -> tuple[str, str, str, str]:
        return (self.query, self.key, self.value, self.output)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class PermutationSpec:
    groups: tuple[PermGroup, ...]
    warnings: tuple[str, ...] = ()
    # Members that are buffers, not weights (BatchNorm running statistics): permuted with their
    # group, but left out of weight matching's cost, as in Git Re-Basin (parameters only).
    buffers: frozenset[str] = frozenset()
    attention: tuple[AttentionSpec, ...] = ()
    traced_with: str = "torch.fx"

    def group(self, name: str) -> PermGroup:
        return next(g for g in self.groups if g.name == name)

    def tensors(self) -> set[str]:
        return {m.tensor for g in self.groups for m in g.members}

    def attention_of(self) -> dict[str, AttentionSpec]:
        """Each attention layer's groups, by group name."""
        return {name: a for a in self.attention for name in a.groups}


def weights_only(spec: PermutationSpec) -> PermutationSpec:
    """The spec without its buffers: the members whose weights weight matching compares."""
    if not spec.buffers:
        return spec
    groups = tuple(
        replace(g, members=tuple(m for m in g.members if m.tensor not in spec.buffers))
        for g in spec.groups
    )
    return replace(spec, groups=groups, buffers=frozenset())


def restrict_to(spec: PermutationSpec, names: set[str] | Mapping[str, object]) -> PermutationSpec:
    """The spec without members whose tensors a state dict leaves out (a tied parameter's
    other name: transformers saves the token embeddings, not the output layer tied to them)."""
    if all(m.tensor in names for g in spec.groups for m in g.members):
        return spec
    groups = tuple(
        replace(g, members=tuple(m for m in g.members if m.tensor in names)) for g in spec.groups
    )
    return replace(spec, groups=groups, buffers=frozenset(b for b in spec.buffers if b in names))


def split_flattened(
    spec: PermutationSpec, shapes: Mapping[str, Sequence[int]]
) -> tuple[PermutationSpec, dict[str, tuple[int, ...]]]:
    """The spec on views in which every flattened unit axis is split into (units, inner).

    Returns that spec, whose members all have ``inner`` 1, and the view shape of each tensor
    that changes; reshaping a tensor to it is a view, nothing is copied.
    """
    split: dict[str, dict[int, int]] = {}
    for m in (m for g in spec.groups for m in g.members if m.inner > 1):
        split.setdefault(m.tensor, {})[m.axis] = m.inner
    if not split:
        return spec, {}
    views = {}
    for name, axes in split.items():
        shape = list(shapes[name])
        for axis in sorted(axes, reverse=True):
            shape[axis : axis + 1] = [shape[axis] // axes[axis], axes[axis]]
        views[name] = tuple(shape)

    def on_view(m: AxisSlice) -> AxisSlice:
        axes = split.get(m.tensor, {})
        if m.axis in axes and m.inner != axes[m.axis]:
            raise MergeCliError(
                f"permutation spec: axis {m.axis} of {m.tensor} is shared by groups whose units "
                "are flattened with different numbers of positions, which the spec cannot align "
                "(please report this model)"
            )
        return replace(m, axis=m.axis + sum(a < m.axis for a in axes), inner=1)

    groups = tuple(replace(g, members=tuple(map(on_view, g.members))) for g in spec.groups)
    return replace(spec, groups=groups), views
