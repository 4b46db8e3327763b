"""The spec tracer's rules for attention heads: units split into (heads, dimensions), through
rotary embeddings and grouped-query repeats, into scaled dot-product attention and back.

A projection's units become ``Heads`` when a reshape splits their axis in two. Moves of other
axes pass them through; a rotary embedding (halves sliced, negated and concatenated, products
with cos/sin tables) marks their dimensions fixed; ``repeat_kv`` (an expand after the head
axis folded into it) repeats them. ``scaled_dot_product_attention`` over query, key and value
heads records the layer and returns new units, heads of the value's dimensions, which a
reshape merges back into the output projection's input. Anything else done to heads raises
``Unhandled``: their units are then fixed, as for any operation the tracer does not know.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch import fx

from mergecli.align.spec_values import (
    FIXED_TENSOR,
    AttentionRecord,
    Feature,
    Heads,
    Packed,
    ParamValue,
    Scores,
    Unhandled,
)


def split_into_heads(
    x: Feature, before: Sequence[int], after: Sequence[int]
) -> Heads | Packed | None:
    """``x``'s unit axis split by a reshape into two axes (heads, dimensions), or three
    (pieces, heads, dimensions) as a fused qkv projection's output is, if it is."""
    if x.inner != 1 or len(x.blocks) != 1:
        return None
    lead = math.prod(before[: x.axis])
    for axis in range(len(after) - 2):
        if math.prod(after[:axis]) != lead or math.prod(after[axis : axis + 3]) != before[x.axis]:
            continue
        if min(after[axis : axis + 3]) > 1:
            return Packed(x.blocks[0][0], axis, axis + 1, axis + 2, *after[axis : axis + 3])
    for axis in range(len(after) - 1):
        if math.prod(after[:axis]) != lead or after[axis] * after[axis + 1] != before[x.axis]:
            continue
        if after[axis] > 1 and after[axis + 1] > 1:
            return Heads(x.blocks[0][0], axis, axis + 1, after[axis], after[axis + 1])
    # (..., batch, heads * dims) -> (..., batch * heads, dims), as nn.MultiheadAttention views.
    if x.axis >= 1 and len(after) == len(before) and after[: x.axis - 1] == before[: x.axis - 1]:
        batch, units, dims = before[x.axis - 1], before[x.axis], after[x.axis]
        folded = after[x.axis - 1]
        if units % dims == 0 and folded == batch * (units // dims) and units // dims > 1:
            heads = units // dims
            return Heads(x.blocks[0][0], x.axis - 1, x.axis, heads, dims, folded=batch)
    return None


def _find_axis(before: Sequence[int], after: Sequence[int], axis: int) -> int | None:
    """Where a reshape puts ``axis`` of ``before`` if it keeps it whole, else None."""
    lead = math.prod(before[:axis])
    for j in range(len(after)):
        if math.prod(after[:j]) == lead and after[j] == before[axis]:
            return j
    return None


def _moved_axes(name: str, args: list[Any], ndim: int, axes: Sequence[int]) -> list[int]:
    """Where ``transpose`` or ``permute`` puts each of ``axes``."""
    if name == "transpose":
        a, b = (i % ndim for i in args[:2])
        swap = {a: b, b: a}
        return [swap.get(axis, axis) for axis in axes]
    dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
    dims = [i % ndim for i in dims]
    return [dims.index(axis) for axis in axes]


class HeadRules:
    """Mixed into the spec builder (``align.spec``), whose ``_shape``, ``_in_shape``, ``values``,
    ``units`` and ``attention_records`` these use: what each operation does to ``Heads``."""

    def _heads_reshape(self, node: fx.Node, x: Heads) -> Any:
        before, after = self._in_shape(node), self._shape(node)
        h, d = x.head_axis, x.dim_axis
        if x.folded > 1:
            # (batch * heads, ...) -> (batch, heads, ...): the batch unfolded again.
            lead = math.prod(before[:h])
            for j in range(len(after) - 1):
                if (
                    math.prod(after[:j]) == lead
                    and (after[j], after[j + 1]) == (x.folded, x.heads)
                    and (new_d := _find_axis(before, after, d)) is not None
                ):
                    return replace(x, head_axis=j + 1, dim_axis=new_d, folded=1)
            raise Unhandled("reshapes heads folded with the batch")
        if d == h + 1:
            # (..., heads, dims) merged back into one axis of units.
            lead = math.prod(before[:h])
            for j in range(len(after)):
                if math.prod(after[:j]) == lead and after[j] == before[h] * before[d]:
                    if x.repeat != 1 or x.broadcast != 1:
                        raise Unhandled("merges repeated heads into units")
                    return Feature(j, [(x.element, x.heads * x.dims)])
        if x.broadcast > 1 and before[h + 1] == x.broadcast:
            # repeat_kv: (b, kv, G, t, d) -> (b, kv * G, t, d).
            lead = math.prod(before[:h])
            for j in range(len(after)):
                if math.prod(after[:j]) == lead and after[j] == before[h] * x.broadcast:
                    new_d = _find_axis(before, after, d)
                    if new_d is None:
                        break
                    return replace(
                        x, head_axis=j, dim_axis=new_d, repeat=x.repeat * x.broadcast, broadcast=1
                    )
        new_h, new_d = _find_axis(before, after, h), _find_axis(before, after, d)
        if new_h is None or new_d is None:
            raise Unhandled("reshapes attention heads")
        broadcast = x.broadcast if new_h + 1 < len(after) and after[new_h + 1] == x.broadcast else 1
        return replace(x, head_axis=new_h, dim_axis=new_d, broadcast=broadcast)

    def _heads_move(self, node: fx.Node, name: str, x: Heads, args: list[Any]) -> Any:
        before, after = self._in_shape(node), self._shape(node)
        h, d = x.head_axis, x.dim_axis
        if name == "transpose":
            a, b = (i % len(before) for i in args[:2])
            swap = {a: b, b: a}
            return x.moved(swap.get(h, h), swap.get(d, d))
        if name == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            dims = [i % len(before) for i in dims]
            return x.moved(dims.index(h), dims.index(d))
        if name == "expand":
            shift = len(after) - len(before)
            h, d = h + shift, d + shift
            grown = h + 1 < len(after) and before[h + 1 - shift] == 1 and after[h + 1] > 1
            return replace(x, head_axis=h, dim_axis=d, broadcast=after[h + 1] if grown else 1)
        raise Unhandled(f"{name} of attention heads")

    def _packed_move(self, node: fx.Node, name: str, x: Packed, args: list[Any]) -> Packed:
        if name not in ("transpose", "permute"):
            raise Unhandled(f"{name} of fused query/key/value heads")
        ndim = len(self._in_shape(node))
        piece, head, dim = _moved_axes(name, args, ndim, (x.piece_axis, x.head_axis, x.dim_axis))
        return replace(x, piece_axis=piece, head_axis=head, dim_axis=dim)

    def _packed_piece(self, x: Packed, index: int) -> Heads:
        """Piece ``index`` (query, key or value) of fused heads: heads of units of its own."""
        size = x.heads * x.dims
        whole = self._cut(
            Feature(0, [(x.element, x.pieces * size)]), range(size, x.pieces * size, size)
        )
        piece = self._units_between(whole, index * size, (index + 1) * size)
        if len(piece.blocks) != 1:
            raise Unhandled("selects a piece of fused heads cut elsewhere")

        def after_removal(axis: int) -> int:
            return axis - (x.piece_axis < axis)

        return Heads(
            piece.blocks[0][0], after_removal(x.head_axis), after_removal(x.dim_axis), x.heads,
            x.dims,
        )  # fmt: skip

    def _packed_select(self, x: Packed, dim: int, index: int) -> Heads:
        if dim != x.piece_axis:
            raise Unhandled("selects within fused query/key/value heads")
        return self._packed_piece(x, index % x.pieces)

    def _heads_flatten(self, x: Heads, start: int, end: int) -> Any:
        """(..., heads, dims) flattened back into units."""
        if (start, end) == (x.head_axis, x.dim_axis) and x.repeat == 1 and x.broadcast == 1:
            return Feature(start, [(x.element, x.heads * x.dims)])
        if end < x.head_axis:
            return x.moved(x.head_axis - (end - start), x.dim_axis - (end - start))
        if start > x.dim_axis:
            return x
        raise Unhandled("flattens attention heads with other axes")

    def _heads_elementwise(self, node: fx.Node, x: Heads, operands: Sequence[Any]) -> Any:
        """Heads with tensors that broadcast over the heads (rotary tables: dims fixed)."""
        out_ndim = len(self._shape(node))
        fixed_dims = x.dims_fixed
        for operand in operands:
            value = self.values.get(operand) if isinstance(operand, fx.Node) else None
            if isinstance(value, Heads):
                if value.element != x.element or (value.head_axis, value.dim_axis) != (
                    x.head_axis,
                    x.dim_axis,
                ):
                    raise Unhandled("combines different attention heads")
                fixed_dims |= value.dims_fixed
                continue
            if isinstance(value, ParamValue):
                shape = value.shape
            elif value is FIXED_TENSOR:
                shape = self._shape(operand)
            elif value is None:
                continue
            else:
                raise Unhandled("combines attention heads with other units")
            shift = out_ndim - len(shape)
            if x.head_axis - shift >= 0 and shape[x.head_axis - shift] != 1:
                raise Unhandled("combines attention heads with a tensor that varies by head")
            if x.dim_axis - shift >= 0 and shape[x.dim_axis - shift] != 1:
                fixed_dims = True  # cos/sin tables, a per-dimension scale
        return replace(x, dims_fixed=fixed_dims)

    def _heads_slice(self, x: Heads, dim: int, whole: bool) -> Heads:
        if dim == x.dim_axis:
            return x if whole else replace(x, dims_fixed=True)  # rotary halves
        if dim == x.head_axis and not whole:
            raise Unhandled("selects some attention heads")
        return x

    def _heads_cat(self, pieces: Sequence[Any], dim: int) -> Heads:
        first = pieces[0]
        if not all(isinstance(p, Heads) and p.element == first.element for p in pieces):
            raise Unhandled("concatenates attention heads with other tensors")
        if dim == first.head_axis:
            raise Unhandled("concatenates along the attention heads")
        return replace(first, dims_fixed=True) if dim == first.dim_axis else first

    def _heads_reduce(self, x: Heads, dims: set[int], keepdim: bool) -> Any:
        if x.head_axis in dims or x.dim_axis in dims:
            return FIXED_TENSOR  # e.g. the variance of a per-head norm
        if keepdim:
            return x
        return x.moved(
            x.head_axis - sum(i < x.head_axis for i in dims),
            x.dim_axis - sum(i < x.dim_axis for i in dims),
        )

    def _heads_select(self, x: Heads, dim: int, index: int = 0) -> Any:
        if dim == x.head_axis and (x.repeat, x.broadcast, x.folded) == (1, 1, 1):
            # One block of units picked from a split ((3, dim): q, k or v of a packed in_proj).
            whole = Feature(0, [(x.element, x.heads * x.dims)])
            cut = self._cut(whole, range(x.dims, x.heads * x.dims, x.dims))
            piece = self._units_between(cut, index * x.dims, (index + 1) * x.dims)
            return piece.at(x.dim_axis - (dim < x.dim_axis))
        if dim in (x.head_axis, x.dim_axis):
            raise Unhandled("selects one attention head or dimension")
        return x.moved(x.head_axis - (dim < x.head_axis), x.dim_axis - (dim < x.dim_axis))

    def _heads_matmul(self, node: fx.Node, a: Any, b: Any) -> Any:
        """Eager attention: q @ k^T gives scores, scores @ v the attended values."""
        ndim = len(self._shape(node))
        heads, dims, keys = ndim - 3, ndim - 1, ndim - 2
        layout = (heads, dims)
        if (
            isinstance(a, Heads)
            and isinstance(b, Heads)
            and (a.head_axis, a.dim_axis, b.head_axis, b.dim_axis) == (heads, dims, heads, keys)
        ):
            return Scores(a, b.moved(heads, dims), heads)
        if (
            isinstance(a, Scores)
            and isinstance(b, Heads)
            and a.head_axis == heads
            and (b.head_axis, b.dim_axis) == layout
        ):
            return self._attention_heads(node, a.query, a.key, b, gqa=False)
        raise Unhandled("multiplies attention heads in a way the tracer does not know")

    def _scores_elementwise(self, node: fx.Node, x: Scores, operands: Sequence[Any]) -> Scores:
        """Scaled, masked scores: anything added must not differ between heads (ALiBi does)."""
        out_ndim = len(self._shape(node))
        for operand in operands:
            value = self.values.get(operand) if isinstance(operand, fx.Node) else None
            if value is None or value == x:
                continue
            if isinstance(value, (ParamValue, Heads, Scores, Feature)):
                raise Unhandled("combines attention scores with a model's tensor")
            shape = self._shape(operand)
            shift = out_ndim - len(shape)
            if x.head_axis - shift >= 0 and shape[x.head_axis - shift] != 1:
                raise Unhandled("adds a different bias to each head's scores")
        return x

    def _attention_heads(self, node: fx.Node, query: Any, key: Any, value: Any, gqa: bool) -> Heads:
        """scaled_dot_product_attention: record the layer; its output is heads of new units."""
        if not all(isinstance(t, Heads) for t in (query, key, value)):
            raise Unhandled("attends over tensors that are not split into heads")
        ndim = len(self._shape(node))
        for t in (query, key, value):
            if (t.head_axis, t.dim_axis) != (ndim - 3, ndim - 1):
                raise Unhandled("attends with heads laid out unlike (batch, heads, tokens, dims)")
        if any(t.folded != 1 for t in (query, key, value)):
            raise Unhandled("attends over heads folded with the batch")
        if query.repeat != 1 or key.repeat != value.repeat or key.heads != value.heads:
            raise Unhandled("repeats heads in a way the tracer does not know")
        heads, kv_heads = query.heads, key.heads
        if key.repeat * kv_heads != heads and not (gqa and key.repeat == 1):
            raise Unhandled(f"attends {heads} query heads over {kv_heads * key.repeat} keys")
        if heads % kv_heads or query.dims != key.dims:
            raise Unhandled("has query and key heads that do not pair up")
        output = self.units.new(heads * value.dims)
        self.attention_records.append(
            AttentionRecord(
                node, query.element, key.element, value.element, output, heads, kv_heads,
                query.dims, value.dims, query.dims_fixed or key.dims_fixed,
            )
        )  # fmt: skip
        return Heads(output, ndim - 3, ndim - 1, heads, value.dims)
