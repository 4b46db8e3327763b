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
    ParamValue,
    Scores,
    Unhandled,
)


def split_into_heads(x: Feature, before: Sequence[int], after: Sequence[int]) -> Heads | None:
    """``x``'s unit axis split into two axes (heads, dimensions) by a reshape, if it is."""
    if x.inner != 1 or len(x.blocks) != 1:
        return None
    lead = math.prod(before[: x.axis])
    for axis in range(len(after) - 1):
        if math.prod(after[:axis]) != lead or after[axis] * after[axis + 1] != before[x.axis]:
            continue
        if after[axis] > 1 and after[axis + 1] > 1:
            return Heads(x.blocks[0][0], axis, axis + 1, after[axis], after[axis + 1])
    return None


def _find_axis(before: Sequence[int], after: Sequence[int], axis: int) -> int | None:
    """Where a reshape puts ``axis`` of ``before`` if it keeps it whole, else None."""
    lead = math.prod(before[:axis])
    for j in range(len(after)):
        if math.prod(after[:j]) == lead and after[j] == before[axis]:
            return j
    return None


class HeadRules:
    """Mixed into the spec builder (``align.spec``), whose ``_shape``, ``_in_shape``, ``values``,
    ``units`` and ``attention_records`` these use: what each operation does to ``Heads``."""

    def _heads_reshape(self, node: fx.Node, x: Heads) -> Any:
        before, after = self._in_shape(node), self._shape(node)
        h, d = x.head_axis, x.dim_axis
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

    def _heads_select(self, x: Heads, dim: int) -> Heads:
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
