"""Permutation specs derived from a model's graph (torch.fx) instead of written by hand.

Hidden units of a network can be permuted without changing its function, as long as every
weight axis that indexes the same units is permuted together. This module traces a module,
follows which axis of every intermediate tensor carries "units", and joins with a union-find
every (tensor, axis) that must share one permutation: a layer's output axis with the next
layer's input axis, norm parameters, both operands of a residual add, blocks of a concat.
Axes that reach the model's input or output, or an operation we cannot reason about, are
joined with FIXED and never permuted; a warning names each such group and why.

The spec's types are in ``align.groups``, the tracing in ``align.tracing``, and the tables of
operations that pass units through unchanged in ``align.ops``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from mergecli.align import ops
from mergecli.align.groups import AttentionSpec, AxisSlice, PermGroup, PermutationSpec, Role
from mergecli.align.spec_aten import AtenRules, is_aten
from mergecli.align.spec_heads import HeadRules, split_into_heads
from mergecli.align.spec_values import (
    FIXED_TENSOR,
    AttentionRecord,
    Feature,
    Heads,
    ParamValue,
    Scores,
    Unhandled,
    Units,
)
from mergecli.align.tracing import export_graph, trace
from mergecli.errors import MergeCliError
from mergecli.models.loading import tied_names


def derive_spec(module: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """Trace ``module`` on ``example_input`` and join the axes of each group: from its
    ``torch.export`` graph, or where export fails, from torch.fx with shapes propagated."""
    try:
        graph_module, exported = export_graph(module, example_input), True
    except Exception as exc:  # noqa: BLE001 - any failure of export falls back to fx
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        graph_module, exported = _fx_graph(module, example_input), False
        graph_module.meta["export_failed"] = reason
    spec = _SpecBuilder(graph_module, exported=exported).build()
    spec = _with_tied_names(spec, module)
    if not exported:
        reason = graph_module.meta["export_failed"]
        spec = replace(spec, warnings=(f"torch.export failed ({reason}); traced with torch.fx",
                                       *spec.warnings))  # fmt: skip
    buffers = {name for name, _ in module.named_buffers()} & spec.tensors()
    return replace(spec, buffers=frozenset(buffers))


def _fx_graph(module: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    graph_module = trace(module)
    try:
        # ShapeProp prints the traceback of a failing node itself; the one line below says it.
        with contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(graph_module).propagate(example_input)
    except Exception as exc:
        reason = " ".join(str(exc.__cause__ or exc).split())[:300]
        raise MergeCliError(
            f"model {type(module).__name__} does not accept an example input of shape "
            f"{list(example_input.shape)} ({reason}); set model.input_shape (without the batch)"
        ) from exc
    return graph_module


def _with_tied_names(spec: PermutationSpec, module: nn.Module) -> PermutationSpec:
    """Every member of a tied parameter repeated under its other names (a language model's
    output layer and its token embeddings): a checkpoint may hold either, or both."""
    tied = tied_names(module)
    if not any(m.tensor in tied for g in spec.groups for m in g.members):
        return spec
    groups = []
    for group in spec.groups:
        members = list(group.members)
        for m in group.members:
            members += [replace(m, tensor=n) for n in tied.get(m.tensor, ()) if n != m.tensor]
        groups.append(replace(group, members=tuple(dict.fromkeys(members))))
    return replace(spec, groups=tuple(groups))


@dataclass
class _SpecBuilder(AtenRules, HeadRules):
    gm: fx.GraphModule
    units: Units = field(default_factory=Units)
    members: list[tuple[int, AxisSlice]] = field(default_factory=list)
    values: dict[fx.Node, Any] = field(default_factory=dict)
    order: list[fx.Node] = field(default_factory=list)
    fixed_notes: list[tuple[set[int], str]] = field(default_factory=list)
    exported: bool = False
    # Elements cut into pieces (GroupNorm groups, chunks): element -> (piece, offset, length).
    replaced: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)
    attention_records: list[AttentionRecord] = field(default_factory=list)

    def build(self) -> PermutationSpec:
        for node in self.gm.graph.nodes:
            try:
                self.values[node] = self._visit(node)
            except Unhandled as exc:
                why = f"{_describe(node, self.gm)} {exc}"
                for value in _tensor_inputs(node, self.values):
                    self._fix(value, why)
                self.values[node] = FIXED_TENSOR
            self.order.append(node)
        return self._groups()

    # -- helpers ---------------------------------------------------------------------------

    def _shape(self, node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta") or node.meta.get("val")
        if meta is None or not hasattr(meta, "shape"):
            raise Unhandled("produces no single tensor")
        return tuple(meta.shape)

    def _fix(self, value: Any, why: str) -> None:
        if isinstance(value, tuple):  # e.g. attention's (output, weights)
            for item in value:
                self._fix(item, why)
        if isinstance(value, Feature):
            self.fixed_notes.append(({e for e, _ in value.blocks}, why))
            for element, _ in value.blocks:
                self.units.join(Units.FIXED, element)
        if isinstance(value, Heads):
            self.fixed_notes.append(({value.element}, why))
            self.units.join(Units.FIXED, value.element)
        if isinstance(value, Scores):
            self._fix(value.query, why)
            self._fix(value.key, why)

    def _member(
        self,
        feature: Feature,
        tensor: str,
        axis: int,
        role: Role,
        producer: str | None = None,
        eps: float | None = None,
    ) -> None:
        offset = 0
        for element, length in feature.blocks:
            member = AxisSlice(tensor, axis, offset, length, role, feature.inner, producer, eps)
            self.members.append((element, member))
            offset += length

    def _new(
        self, tensor_prefix: str, size: int, axis: int, bias: bool, weight_axis: int = 0
    ) -> Feature:
        """New units on ``axis`` of the output, made by the weight's ``weight_axis``."""
        element = self.units.new(size)
        weight = AxisSlice(f"{tensor_prefix}weight", weight_axis, 0, size, "out")
        self.members.append((element, weight))
        if bias:
            self.members.append((element, AxisSlice(f"{tensor_prefix}bias", 0, 0, size, "out")))
        return Feature(axis, [(element, size)])

    def _require(self, value: Any, axis: int, what: str) -> Feature | None:
        """The feature of ``value`` if it sits on ``axis``; None if the value is fixed."""
        if value is FIXED_TENSOR or isinstance(value, ParamValue):
            return None
        if not isinstance(value, Feature):
            raise Unhandled(f"{what}: input is not a tensor")
        if value.axis != axis:
            raise Unhandled(f"{what}: units on axis {value.axis}, expected axis {axis}")
        return value

    def _consume(
        self, value: Any, axis: int, tensor: str, size: int, what: str, weight_axis: int = 1
    ) -> None:
        feature = self._require(value, axis, what)
        if feature is None:
            return
        if feature.entries != size:
            raise Unhandled(f"{what}: {feature.entries} units into an axis of {size}")
        self._member(feature, tensor, weight_axis, "in")

    # -- the rules -------------------------------------------------------------------------

    def _visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return FIXED_TENSOR
        if node.op == "get_attr":
            tensor = _get_attr(self.gm, str(node.target))
            if isinstance(tensor, torch.Tensor):
                return ParamValue(str(node.target), tuple(tensor.shape))
            return None
        if node.op == "output":
            for value in _tensor_inputs(node, self.values):
                self._fix(value, "reaches the model output")
            return None
        if node.op == "call_module":
            if node.target == "_guards_fn":  # an exported graph's check of its input shapes
                return None
            return self._module(node, self.gm.get_submodule(str(node.target)))
        if node.op == "call_function":
            return self._function(node)
        if node.op == "call_method":
            return self._method(node)
        raise Unhandled(f"unknown node kind {node.op}")

    def _arg(self, node: fx.Node, index: int = 0) -> Any:
        arg = node.args[index]
        return self.values.get(arg) if isinstance(arg, fx.Node) else arg

    def _module(self, node: fx.Node, module: nn.Module) -> Any:
        prefix = f"{node.target}."
        if isinstance(module, nn.MultiheadAttention):
            return self._attention(node, module, prefix)
        x = self._arg(node)
        ndim = len(self._shape(node))
        if isinstance(module, nn.Linear):
            self._consume(x, ndim - 1, f"{prefix}weight", module.in_features, "Linear")
            return self._new(prefix, module.out_features, ndim - 1, module.bias is not None)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if module.groups == 1:
                self._consume(x, 1, f"{prefix}weight", module.in_channels, "conv")
                return self._new(prefix, module.out_channels, 1, module.bias is not None)
            if module.groups == module.in_channels == module.out_channels:
                feature = self._require(x, 1, "depthwise conv")
                if feature is None:
                    return FIXED_TENSOR
                self._member(feature, f"{prefix}weight", 0, "norm")
                if module.bias is not None:
                    self._member(feature, f"{prefix}bias", 0, "norm")
                return feature
            raise Unhandled(f"is a grouped conv (groups={module.groups})")
        if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            if module.groups != 1:
                raise Unhandled(f"is a grouped transposed conv (groups={module.groups})")
            # Its weight is (in, out, *kernel): the axes the other way round from a conv's.
            weight, bias = f"{prefix}weight", module.bias is not None
            self._consume(x, 1, weight, module.in_channels, "transposed conv", weight_axis=0)
            return self._new(prefix, module.out_channels, 1, bias, weight_axis=1)
        if isinstance(module, nn.Embedding):
            return self._new(prefix, module.embedding_dim, ndim - 1, False, weight_axis=1)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return self._norm(
                x, 1, prefix, module, ("weight", "bias", "running_mean", "running_var"),
                role="unit_norm", producer=self._sole_producer(node, module),
            )  # fmt: skip
        if isinstance(module, nn.LayerNorm):
            if len(module.normalized_shape) != 1:
                raise Unhandled("normalises over several axes")
            if isinstance(x, Feature) and x.axis != ndim - 1:
                return x  # normalises other units than ours, and does not mix ours
            return self._norm(x, ndim - 1, prefix, module, ("weight", "bias"))
        if isinstance(module, nn.modules.instancenorm._InstanceNorm):
            return self._norm(
                x, 1, prefix, module, ("weight", "bias", "running_mean", "running_var"),
                role="unit_norm",
            )  # fmt: skip
        if isinstance(module, nn.PReLU):
            if module.num_parameters == 1:
                return x
            return self._norm(x, 1, prefix, module, ("weight",))
        if isinstance(module, nn.GroupNorm):
            feature = self._require(x, 1, "GroupNorm")
            if feature is not None and 1 < module.num_groups < module.num_channels:
                # Statistics are shared within each group of channels: units may move only
                # inside their group, so each group of channels becomes units of its own.
                # (One group, or one per channel, constrains nothing.)
                size = module.num_channels // module.num_groups
                x = self._cut(feature, range(size, module.num_channels, size))
            return self._norm(x, 1, prefix, module, ("weight", "bias"))
        if isinstance(module, ops.PASS_MODULES):
            return x
        if isinstance(module, ops.POOL_MODULES):
            self._require(x, 1, type(module).__name__)
            return x
        if isinstance(module, nn.Flatten):
            return self._flatten(node, x, module.start_dim, module.end_dim)
        reason = self.gm.meta.get("untraceable", {}).get(str(node.target))
        if reason is not None:
            raise Unhandled(f"cannot be traced by torch.fx inside ({reason})")
        raise Unhandled("is a module the tracer does not know")

    def _attention(self, node: fx.Node, module: nn.MultiheadAttention, prefix: str) -> Any:
        """Query, key and value units enter the projections' columns; heads stay as they are.

        The output is out_proj's units, and the attention weights carry none.
        """
        names = ("query", "key", "value")
        inputs = [
            node.args[i] if i < len(node.args) else node.kwargs[n] for i, n in enumerate(names)
        ]
        axis = len(self._shape(inputs[0])) - 1
        values = [self.values.get(t) if isinstance(t, fx.Node) else None for t in inputs]
        features = [self._require(v, axis, "MultiheadAttention") for v in values]
        if module.in_proj_weight is not None:
            # One packed in_proj: a permutation of its columns moves all three inputs alike.
            if any(f is None for f in features):
                if any(f is not None for f in features):
                    raise Unhandled("attends over inputs of which only some can be permuted")
            else:
                joined = features[0]
                for other in features[1:]:
                    joined = self._join_blocks(joined, other)
                self._member(joined, f"{prefix}in_proj_weight", 1, "in")
        else:
            for feature, name in zip(features, ("q", "k", "v"), strict=True):
                if feature is not None:
                    self._member(feature, f"{prefix}{name}_proj_weight", 1, "in")
        out = module.out_proj
        output = self._new(f"{prefix}out_proj.", out.out_features, axis, out.bias is not None)
        return (output, FIXED_TENSOR)

    def _norm(
        self,
        x: Any,
        axis: int,
        prefix: str,
        module: nn.Module,
        names: tuple,
        role: Role = "norm",
        producer: str | None = None,
    ) -> Any:
        feature = self._require(x, axis, type(module).__name__)
        if feature is None:
            return FIXED_TENSOR
        eps = float(getattr(module, "eps", 0.0)) if producer else None
        for name in names:
            if getattr(module, name, None) is not None:
                self._member(feature, f"{prefix}{name}", 0, role, producer, eps)
        return feature

    def _sole_producer(self, node: fx.Node, module: nn.Module) -> str | None:
        """The Linear or conv whose output only this BatchNorm reads (its scale can be folded
        into that layer's rows), if there is one and the norm has weights and statistics."""
        source = node.args[0] if node.args else None
        if not (getattr(module, "affine", False) and getattr(module, "track_running_stats", False)):
            return None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            return None
        layer = self.gm.get_submodule(str(source.target))
        dense = isinstance(layer, nn.Linear)
        conv = isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and layer.groups == 1
        return f"{source.target}." if dense or conv else None

    def _function(self, node: fx.Node) -> Any:
        target = node.target
        if is_aten(target):
            return self._aten(node)
        if target in ops.PASS_FUNCTIONS:
            return self._arg(node)
        if target in ops.POOL_FUNCTIONS:
            self._require(self._arg(node), 1, getattr(target, "__name__", "pool"))
            return self._arg(node)
        if target in ops.ELEMENTWISE:
            return self._elementwise(node, node.args[:2])
        if target in (torch.squeeze, torch.unsqueeze, torch.reshape):
            return self._reshape(node, self._arg(node))
        if target is torch.nn.functional.pad:
            return self._pad(node, self._arg(node))
        if target in (torch.chunk, torch.split):
            return self._chunks(node, self._arg(node), str(target.__name__))
        if target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, self._arg(node), start, end)
        if target is torch.cat:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            return self._cat(node, node.args[0], dim)
        if target is operator.getitem:
            return self._getitem(node)
        if target is getattr:  # x.shape and friends
            return None
        if target in (torch.mean, torch.sum, torch.amax, torch.amin):
            return self._reduce(node)
        raise Unhandled("is a function the tracer does not know")

    def _method(self, node: fx.Node) -> Any:
        name = str(node.target)
        x = self._arg(node)
        if name in ("size", "dim"):
            return None
        if name in ops.PASS_METHODS:
            return x
        if name in ops.ELEMENTWISE_METHODS:
            return self._elementwise(node, node.args[:2])
        if name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, x, start, end)
        if name in ("chunk", "split"):
            return self._chunks(node, x, name)
        if name in ("view", "reshape", "squeeze", "unsqueeze"):
            return self._reshape(node, x)
        if name in ("transpose", "permute", "expand", "unflatten"):
            return self._move(node, name, x)
        if name in ops.REDUCTIONS:
            return self._reduce(node)
        raise Unhandled("is a method the tracer does not know")

    # -- shape-changing rules ----------------------------------------------------------------

    def _in_shape(self, node: fx.Node) -> tuple[int, ...]:
        arg = node.args[0]
        return self._shape(arg) if isinstance(arg, fx.Node) else ()

    def _flatten(self, node: fx.Node, x: Any, start: int, end: int) -> Any:
        if not isinstance(x, Feature):
            return x if x is None else FIXED_TENSOR
        shape = self._in_shape(node)
        start, end = start % len(shape), end % len(shape)
        if x.axis < start:
            return x
        if x.axis > end:
            return x.at(x.axis - (end - start))
        if math.prod(shape[start : x.axis]) == 1:
            # Units lead what is flattened (channels before positions): each unit becomes a
            # run of consecutive entries, which a permutation moves as one block.
            return Feature(start, x.blocks, x.inner * math.prod(shape[x.axis + 1 : end + 1]))
        raise Unhandled("flattens units together with axes before them")

    def _chunks(self, node: fx.Node, x: Any, name: str) -> Any:
        """``chunk``/``split``: a tuple of pieces; cut along the unit axis, each piece's units are
        its own (joined again if they meet, as the halves of a gated unit do)."""
        pieces = self._shape_list(node)
        if not isinstance(x, Feature):
            return tuple(x if x is None else FIXED_TENSOR for _ in pieces)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim %= len(self._in_shape(node))
        if dim != x.axis:
            return tuple(x for _ in pieces)
        sizes = [shape[dim] for shape in pieces]
        if any(size % x.inner for size in sizes):
            raise Unhandled(f"{name} cuts flattened units apart")
        bounds = list(itertools.accumulate(size // x.inner for size in sizes))
        cut = self._cut(x, bounds[:-1])
        spans = itertools.pairwise([0, *bounds])
        return tuple(self._units_between(cut, lo, hi) for lo, hi in spans)

    def _shape_list(self, node: fx.Node) -> list[tuple[int, ...]]:
        meta = node.meta.get("tensor_meta") or node.meta.get("val")
        if not isinstance(meta, (list, tuple)) or not all(hasattr(m, "shape") for m in meta):
            raise Unhandled("produces no tuple of tensors")
        return [tuple(m.shape) for m in meta]

    def _units_between(self, x: Feature, lo: int, hi: int) -> Feature:
        """The blocks of ``x`` covering units [lo, hi), which ``_cut`` made block boundaries."""
        blocks, start = [], 0
        for element, length in x.blocks:
            if lo <= start and start + length <= hi:
                blocks.append((element, length))
            start += length
        return Feature(x.axis, blocks, x.inner)

    def _cut(self, x: Feature, positions: Iterable[int]) -> Feature:
        """``x`` with its blocks cut at unit ``positions``: the pieces become separate units.

        A block's element shares its units with every element joined to it, so all of them
        are cut alike and their pieces joined piece by piece; every member and value that
        refers to them is rewritten in terms of the pieces.
        """
        x = self._current(x)
        wanted, start = set(positions), 0
        by_class: dict[int, tuple[list[int], set[int]]] = {}  # root -> elements, cuts
        for element, length in x.blocks:
            inside = {p - start for p in wanted if start < p < start + length}
            start += length
            if not inside:
                continue
            root = self.units.find(element)
            # Fixed elements share a root without sharing units: each is cut on its own.
            key = -element if root == Units.FIXED else root
            if key not in by_class:
                if root == Units.FIXED:
                    elements = [element]
                else:
                    elements = [
                        e for e in range(1, len(self.units.parent)) if self.units.find(e) == root
                    ]
                by_class[key] = (elements, set())
            by_class[key][1].update(inside)
        if not by_class:
            return x
        replaced: dict[int, list[tuple[int, int, int]]] = {}
        for elements, inside in by_class.values():
            bounds = [0, *sorted(inside), self.units.size[elements[0]]]
            firsts: list[int] = []
            for element in elements:
                pieces = [(self.units.new(b - a), a, b - a) for a, b in itertools.pairwise(bounds)]
                replaced[element] = pieces
                for k, (piece, _, _) in enumerate(pieces):
                    if len(firsts) <= k:
                        firsts.append(piece)
                    self.units.join(firsts[k], piece)
                    if self.units.find(element) == Units.FIXED:
                        self.units.join(Units.FIXED, piece)
        self.replaced.update(replaced)
        self.members = [
            (piece, replace(m, offset=m.offset + offset, length=length))
            for element, m in self.members
            for piece, offset, length in replaced.get(element, [(element, 0, m.length)])
        ]
        self.fixed_notes = [
            (elements | {p for e in elements for p, _, _ in replaced.get(e, [])}, why)
            for elements, why in self.fixed_notes
        ]
        self.values = {node: self._current(value) for node, value in self.values.items()}
        return self._current(x)

    def _current(self, value: Any) -> Any:
        """``value`` with every block of an element since cut replaced by its pieces."""
        if isinstance(value, tuple):
            return tuple(self._current(v) for v in value)
        if not isinstance(value, Feature) or not any(e in self.replaced for e, _ in value.blocks):
            return value
        blocks = [
            (piece, length)
            for element, size in value.blocks
            for piece, _, length in self.replaced.get(element, [(element, 0, size)])
        ]
        return self._current(Feature(value.axis, blocks, value.inner))

    def _pad(self, node: fx.Node, x: Any) -> Any:
        if not isinstance(x, Feature):
            return x if x is None else FIXED_TENSOR
        pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
        if x.axis < len(self._in_shape(node)) - len(pad) // 2:
            return x  # pads axes after the units only
        raise Unhandled("pads the unit axis")

    def _reshape(self, node: fx.Node, x: Any) -> Any:
        if isinstance(x, Heads):
            return self._heads_reshape(node, x)
        if not isinstance(x, Feature):
            return FIXED_TENSOR if x is not None else None
        before, after = self._in_shape(node), self._shape(node)
        lead = math.prod(before[: x.axis])
        for axis in range(len(after)):
            if math.prod(after[:axis]) != lead:
                continue
            # The unit axis kept, or merged with the axes after it (x.view(x.size(0), -1)).
            for last in range(x.axis, len(before)):
                if after[axis] == math.prod(before[x.axis : last + 1]):
                    inner = x.inner * math.prod(before[x.axis + 1 : last + 1])
                    return Feature(axis, x.blocks, inner)
        heads = split_into_heads(x, before, after)
        if heads is not None:
            return heads
        raise Unhandled("reshapes the unit axis")

    def _move(self, node: fx.Node, name: str, x: Any) -> Any:
        if isinstance(x, ParamValue) and name == "expand":
            return x  # expand only adds leading axes; broadcasting aligns the rest
        before, after = self._in_shape(node), self._shape(node)
        args = [a for a in node.args[1:]]
        if isinstance(x, Heads):
            return self._heads_move(node, name, x, args)
        if not isinstance(x, Feature):
            return x if x is None or x is FIXED_TENSOR else FIXED_TENSOR
        if name == "transpose":
            a, b = (d % len(before) for d in args[:2])
            axis = b if x.axis == a else a if x.axis == b else x.axis
            return x.at(axis)
        if name == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            dims = [d % len(before) for d in dims]
            return x.at(dims.index(x.axis))
        if name == "expand":
            return x.at(x.axis + len(after) - len(before))
        dim = args[0] % len(before)  # unflatten
        if dim == x.axis:
            heads = split_into_heads(x, before, after)
            if heads is None:
                raise Unhandled("splits the unit axis")
            return heads
        return x.at(x.axis + (len(after) - len(before) if dim < x.axis else 0))

    def _reduce(self, node: fx.Node) -> Any:
        x = self._arg(node)
        if not isinstance(x, (Feature, Heads)):
            return FIXED_TENSOR
        before = self._in_shape(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dims is None:
            return FIXED_TENSOR  # a full reduction is invariant to permutations
        dims = {d % len(before) for d in ((dims,) if isinstance(dims, int) else dims)}
        if isinstance(x, Heads):
            return self._heads_reduce(x, dims, keepdim)
        if x.axis in dims:
            return FIXED_TENSOR  # a sum over units does not depend on their order
        if keepdim:
            return x
        return x.at(x.axis - sum(d < x.axis for d in dims))

    def _getitem(self, node: fx.Node) -> Any:
        x = self._arg(node)
        if isinstance(x, tuple):
            index = node.args[1]
            return x[index] if isinstance(index, int) else FIXED_TENSOR
        if not isinstance(x, Feature):
            return None if x is None else FIXED_TENSOR
        index = node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        ndim = len(self._in_shape(node))
        if Ellipsis in index:
            at = index.index(Ellipsis)
            fill = ndim - (len(index) - 1 - sum(i is None for i in index))
            index = index[:at] + (slice(None),) * fill + index[at + 1 :]
        axis, out_axis = 0, 0
        for item in index:
            if item is None:
                out_axis += 1
                continue
            if axis == x.axis:
                if item == slice(None):
                    return x.at(out_axis)
                raise Unhandled("selects some units only")
            if isinstance(item, int):
                axis += 1
            elif isinstance(item, slice):
                axis, out_axis = axis + 1, out_axis + 1
            else:
                raise Unhandled("indexes with a tensor")
        return x.at(out_axis + x.axis - axis)

    def _elementwise(
        self, node: fx.Node, operands: Sequence[Any], scaling: bool | None = None
    ) -> Any:
        """add / sub / mul / div: tensor operands broadcast together must share their units.

        A parameter multiplying units (a norm's weight: ``scaling``) may only be permuted with
        them; one added to them (a position table, a bias) is mapped like them."""
        out_ndim = len(self._shape(node))
        scores = [v for v in map(self._value_of, operands) if isinstance(v, Scores)]
        if scores:
            return self._scores_elementwise(node, scores[0], operands)
        heads = [v for v in map(self._value_of, operands) if isinstance(v, Heads)]
        if heads:
            return self._heads_elementwise(node, heads[0], operands)
        if scaling is None:
            scaling = node.target in (operator.mul, operator.imul, operator.truediv, torch.mul,
                                      torch.div, operator.itruediv) or node.target in (
                "mul", "mul_", "div", "div_")  # fmt: skip
        features: list[tuple[int, Feature]] = []
        params: list[ParamValue] = []
        fixed: list[fx.Node] = []
        for operand in operands:
            value = self.values.get(operand) if isinstance(operand, fx.Node) else None
            if isinstance(value, Feature):
                shift = out_ndim - len(self._shape(operand))
                features.append((value.axis + shift, value))
            elif isinstance(value, ParamValue):
                params.append(value)
            elif value is FIXED_TENSOR:
                fixed.append(operand)
        if not features:
            return FIXED_TENSOR if (fixed or params) else None
        axis, first = features[0]
        for other_axis, other in features[1:]:
            if other_axis != axis:
                raise Unhandled("combines tensors whose units are on different axes")
            first = self._join_blocks(first, other)
        for operand in fixed:
            shape = self._shape(operand)
            position = axis - (out_ndim - len(shape))
            if position >= 0 and shape[position] != 1:
                self._fix(first, f"{_describe(node, self.gm)} combines units with a fixed tensor")
        for param in params:
            position = axis - (out_ndim - len(param.shape))
            if position >= 0 and param.shape[position] != 1:
                self._member(first, param.name, position, "norm" if scaling else "out")
        return first

    def _join_blocks(self, a: Feature, b: Feature) -> Feature:
        """Join ``a``'s units with ``b``'s one by one; returns ``a`` as it stands after.

        Where their blocks differ (concats of other sizes, GroupNorm groups on one side), both
        are first cut at each other's block boundaries.
        """
        if a.inner != b.inner:
            raise Unhandled("combines units flattened with different numbers of positions")
        if a.length != b.length:
            raise Unhandled(f"combines {a.length} units with {b.length}")
        a = self._cut(a, _boundaries(self._current(b)))
        b = self._cut(b, _boundaries(a))
        a = self._current(a)
        for (ea, _), (eb, _) in zip(a.blocks, b.blocks, strict=True):
            self.units.join(ea, eb)
        return a

    def _cat(self, node: fx.Node, tensors: Sequence[Any], dim: int) -> Any:
        out_shape = self._shape(node)
        dim = dim % len(out_shape)
        if isinstance(tensors, fx.Node):  # torch.cat(pieces) of a tuple made in the graph
            pieces = self.values.get(tensors)
            if isinstance(pieces, tuple) and any(isinstance(p, Heads) for p in pieces):
                return self._heads_cat(pieces, dim)
            if not isinstance(pieces, tuple) or not all(isinstance(p, Feature) for p in pieces):
                raise Unhandled("concatenates a sequence whose pieces it cannot see")
            if pieces[0].axis != dim:  # along tokens, say: every piece has the same units
                joined = pieces[0]
                for piece in pieces[1:]:
                    joined = self._join_blocks(joined, piece)
                return joined
            if any(p.axis != dim or p.inner != pieces[0].inner for p in pieces):
                raise Unhandled("concatenates pieces with units laid out differently")
            return Feature(dim, [b for p in pieces for b in p.blocks], pieces[0].inner)
        values = [self.values.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        if any(isinstance(v, Heads) for v in values):
            return self._heads_cat(values, dim)
        features = [v for v in values if isinstance(v, Feature)]
        if not features:
            return FIXED_TENSOR
        if features[0].axis != dim:
            # Concatenating along another axis (e.g. tokens): all pieces share their units.
            return self._elementwise(node, tensors)
        inner = features[0].inner
        blocks: list[tuple[int, int]] = []
        for tensor, value in zip(tensors, values, strict=True):
            if isinstance(value, Feature):
                if value.axis != dim:
                    raise Unhandled("concatenates tensors with units on different axes")
                if value.inner != inner:
                    raise Unhandled("concatenates units flattened with different positions")
                blocks += value.blocks
            else:
                size, rest = divmod(self._shape(tensor)[dim], inner)
                if rest:
                    raise Unhandled("concatenates flattened units with other entries")
                element = self.units.new(size)
                self.units.join(Units.FIXED, element)
                blocks.append((element, size))
        return Feature(dim, blocks, inner)

    # -- result ------------------------------------------------------------------------------

    def _groups(self) -> PermutationSpec:
        head_warnings = self._check_attention()
        by_root: dict[int, list[AxisSlice]] = {}
        for element, member in self.members:
            by_root.setdefault(self.units.find(element), []).append(member)
        # Per group, the node whose output shows its units on the most samples (conv maps before
        # pooling), the last such node (after the nonlinearity) on ties.
        activation: dict[int, tuple[int, int, str, int, int]] = {}
        for index, node in enumerate(self.order):
            value = self.values.get(node)
            if not isinstance(value, Feature) or value.inner != 1:
                continue
            shape = self._shape(node)
            samples = math.prod(shape) // shape[value.axis]
            offset = 0
            for element, length in value.blocks:
                root = self.units.find(element)
                candidate = (samples, index, node.name, value.axis, offset)
                activation[root] = max(activation.get(root, candidate), candidate)
                offset += length
        hooks = self._hook_points() if self.exported else {}
        groups, warnings, names = [], list(head_warnings), set()
        group_of: dict[int, str] = {}
        for root, members in by_root.items():
            name = _group_name(members, names)
            if root == Units.FIXED:
                continue
            if root not in activation:
                warnings.append(f"group '{name}' has no activation in the graph; left unpermuted")
                continue
            _, _, node_name, axis, offset = activation[root]
            size = self.units.size[root]
            module, as_input = None, False
            if root in hooks:
                _, _, module, as_input, axis, offset = hooks[root]
            group_of[root] = name
            groups.append(
                PermGroup(name, size, tuple(members), node_name, axis, offset, module, as_input)
            )
        for elements, why in self.fixed_notes:
            touched = [m for e, m in self.members if e in elements]
            if touched and "model output" not in why:
                name = _group_name(touched, set())
                warnings.append(f"units of '{name}' left unpermuted: {why}")
        attention = tuple(
            AttentionSpec(
                _common_prefix(*(group_of[self.units.find(e)] for e in (r.query, r.output))),
                *(group_of[self.units.find(e)] for e in (r.query, r.key, r.value, r.output)),
                r.heads, r.kv_heads, r.qk_dims, r.v_dims, r.qk_dims_fixed,
            )
            for r in self.attention_records
        )  # fmt: skip
        return PermutationSpec(
            tuple(groups), tuple(dict.fromkeys(warnings)), attention=attention,
            traced_with="torch.export" if self.exported else "torch.fx",
        )  # fmt: skip

    def _check_attention(self) -> list[str]:
        """Keep the attention layers whose four groups are distinct, permutable and their own;
        fix the others' units (heads are never permuted as if they were plain units)."""
        warnings, kept, seen = [], [], set()
        has_members = {self.units.find(e) for e, _ in self.members}
        for record in self.attention_records:
            elements = (record.query, record.key, record.value, record.output)
            roots = [self.units.find(e) for e in elements]
            why = None
            if any(e in self.replaced for e in elements):
                why = "its projections' units are cut into pieces elsewhere"
            elif Units.FIXED in roots:
                why = "some of its projections' units cannot be permuted"
            elif len(set(roots)) < 4 or seen & set(roots):
                why = "its projections share units with another attention or each other"
            elif not set(roots) <= has_members:
                why = "its output does not reach a projection"
            if why is None:
                kept.append(record)
                seen.update(roots)
                continue
            for element in elements:
                self.units.join(Units.FIXED, element)
            warnings.append(
                f"attention heads at {_describe(record.node, self.gm)} left unpermuted: {why}"
            )
        # A layer kept before a later one failed may share nothing with it: check again.
        self.attention_records = [
            r for r in kept
            if Units.FIXED not in {self.units.find(e) for e in (r.query, r.key, r.value, r.output)}
        ]  # fmt: skip
        return warnings

    def _hook_points(self) -> dict[int, tuple[int, int, str, bool, int, int]]:
        """Per group root, the submodule input or output that shows its units best (most
        samples, the latest on ties), for activation statistics read by forward hooks."""
        leaves = {name for name, m in self.gm.meta["module"].named_modules() if not any(
            True for _ in m.children())}  # fmt: skip
        scope: dict[fx.Node, str | None] = {}
        for node in self.order:
            stack = node.meta.get("nn_module_stack")
            path = list(stack.values())[-1][0] if stack else None
            scope[node] = path if path in leaves else None
        points: list[tuple[fx.Node, str, bool]] = []
        for index, node in enumerate(self.order):
            module = scope[node]
            if module is None:
                continue
            first = index == 0 or scope[self.order[index - 1]] != module
            last = index + 1 == len(self.order) or scope[self.order[index + 1]] != module
            if first and node.args and isinstance(node.args[0], fx.Node):
                source = node.args[0]
                if scope.get(source) != module:
                    points.append((source, module, True))
            if last:
                points.append((node, module, False))
        best: dict[int, tuple[int, int, str, bool, int, int]] = {}
        for rank, (node, module, as_input) in enumerate(points):
            value = self.values.get(node)
            if not isinstance(value, Feature) or value.inner != 1:
                continue
            shape = self._shape(node)
            samples = math.prod(shape) // shape[value.axis]
            offset = 0
            for element, length in value.blocks:
                root = self.units.find(element)
                candidate = (samples, rank, module, as_input, value.axis, offset)
                if root not in best or candidate[:2] > best[root][:2]:
                    best[root] = candidate
                offset += length
        return best


def _common_prefix(a: str, b: str) -> str:
    """'m.layers.0.attn.q_proj', 'm.layers.0.attn.o_proj' -> 'm.layers.0.attn'."""
    common = []
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        common.append(x)
    return ".".join(common) or a


def _boundaries(x: Feature) -> list[int]:
    return list(itertools.accumulate(length for _, length in x.blocks))[:-1]


def _group_name(members: list[AxisSlice], taken: set[str]) -> str:
    """Name a group after the first layer that produces it (e.g. 'layers.0')."""
    producer = next((m for m in members if m.role == "out"), members[0])
    base = producer.tensor.rsplit(".", 1)[0] if "." in producer.tensor else producer.tensor
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}#{k}"
    taken.add(name)
    return name


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(str(node.target))).__name__})"
    target = getattr(node.target, "__name__", node.target)
    return f"node {node.name} ({target})"


def _tensor_inputs(node: fx.Node, values: dict[fx.Node, Any]) -> list[Any]:
    found: list[Any] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(values.get(n)))
    return found


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)
