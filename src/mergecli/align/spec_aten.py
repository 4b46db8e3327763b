"""The spec tracer's rules for ATen operations, the graphs ``torch.export`` gives.

Each rule reads the operation's arguments by their schema names and reuses the builder's
rules for fx graphs (``align.spec``): a ``linear`` is an ``nn.Linear`` whose weight and bias
are named by the graph's parameters, a ``view`` a reshape, and so on. Operations whose tensor
inputs carry no units (masks, position ids, rotary tables) give plain tensors without a
warning; an unknown operation that units reach fixes them, as in fx graphs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from mergecli.align.groups import AxisSlice
from mergecli.align.spec_values import (
    FIXED_TENSOR,
    Feature,
    Heads,
    Packed,
    ParamValue,
    Scores,
    Unhandled,
)

# Operations that keep every entry where it is (elementwise maps, dtype and device moves).
PASS = {
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "tanh", "sigmoid", "dropout",
    "feature_dropout", "alpha_dropout", "neg", "abs", "clone", "contiguous", "alias", "to",
    "_to_copy", "detach", "hardtanh", "hardtanh_", "leaky_relu", "elu", "celu", "selu",
    "softplus", "hardswish", "hardsigmoid", "mish", "erf", "rsqrt", "sqrt", "exp", "sin", "cos",
    "pow", "lift_fresh_copy", "type_as", "clamp", "clamp_min", "clamp_max", "square",
    "reciprocal", "log", "softmax", "_softmax", "log_softmax", "_log_softmax", "tanh_",
}  # fmt: skip
POOL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_bilinear2d", "upsample_nearest3d", "upsample_linear1d", "upsample_bicubic2d",
    "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
    "replication_pad2d", "pad",
}  # fmt: skip
ELEMENTWISE = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "rsub"}
SCALING = {"mul", "mul_", "div", "div_"}  # a parameter here scales units: a norm's weight
NO_VALUE = {"_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_numel", "sym_stride"}
RESHAPES = {"view", "reshape", "_unsafe_view", "squeeze", "unsqueeze"}
REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std"}
CONVS = {"conv1d", "conv2d", "conv3d"}
CONV_TRANSPOSES = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}


def named_arguments(node: fx.Node) -> dict[str, Any]:
    """An ATen node's arguments by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    named: dict[str, Any] = {}
    for index, argument in enumerate(schema.arguments):
        if index < len(node.args):
            named[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            named[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            named[argument.name] = argument.default_value
    return named


def is_aten(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload)


class AtenRules:
    """Mixed into the spec builder (``align.spec``): the ATen operations of exported graphs."""

    def _aten(self, node: fx.Node) -> Any:
        name = node.target.overloadpacket.__name__  # type: ignore[union-attr]
        if name in NO_VALUE:
            return None
        a = named_arguments(node)
        value = self._value_of
        first = next(iter(a.values()), None)
        x = value(first)
        if name in PASS:
            if name == "pow" and isinstance(a.get("exponent"), fx.Node):
                return self._elementwise(node, [first, a["exponent"]])
            return x
        if name in ELEMENTWISE:
            return self._elementwise(node, list(node.args[:2]), scaling=name in SCALING)
        if name == "linear":
            return self._dense(node, x, a["weight"], a.get("bias"), weight_in=1)
        if name == "addmm":  # GPT-2's Conv1D: bias + x @ W, W stored (in, out)
            return self._dense(node, value(a["mat1"]), a["mat2"], a["self"], weight_in=0)
        weight = a.get("other", a.get("mat2"))
        if name in ("mm", "matmul") and isinstance(value(weight), ParamValue):
            return self._dense(node, x, weight, None, weight_in=0)
        if name == "matmul" and isinstance(x, (Heads, Scores)):
            return self._heads_matmul(node, x, value(weight))
        if name in CONVS or (name == "convolution" and not a["transposed"]):
            return self._conv(node, x, a["weight"], a.get("bias"), int(a["groups"]))
        if name in CONV_TRANSPOSES or name == "convolution":
            if int(a["groups"]) != 1:
                raise Unhandled(f"is a grouped transposed conv (groups={a['groups']})")
            self._consume(x, 1, _param(a["weight"]), self._shape(a["weight"])[0], "conv", 0)
            return self._produce(node, a["weight"], a.get("bias"), 1, 1)
        if name == "embedding":
            return self._produce(node, a["weight"], None, len(self._shape(node)) - 1, 1)
        if name in ("batch_norm", "_native_batch_norm_legit_no_training", "instance_norm"):
            names = [a.get(k) for k in ("weight", "bias", "running_mean", "running_var")]
            producer = self._dense_producer(a["input"]) if name != "instance_norm" else None
            out = self._norm_params(x, 1, names, "unit_norm", producer, float(a.get("eps", 0.0)))
            return (out, FIXED_TENSOR, FIXED_TENSOR) if name.startswith("_native") else out
        if name in ("layer_norm", "rms_norm"):
            ndim = len(self._shape(node))
            if len(a["normalized_shape"]) != 1:
                raise Unhandled("normalises over several axes")
            if isinstance(x, Feature) and x.axis != ndim - 1:
                return x
            if isinstance(x, Heads):
                return self._heads_elementwise(node, x, [])  # a per-head norm (qk-norm)
            return self._norm_params(x, ndim - 1, [a.get("weight"), a.get("bias")], "norm")
        if name == "group_norm":
            feature = self._require(x, 1, "GroupNorm")
            groups, channels = int(a["num_groups"]), self._shape(node)[1]
            if feature is not None and 1 < groups < channels:
                size = channels // groups
                x = self._cut(feature, range(size, channels, size))
            return self._norm_params(x, 1, [a.get("weight"), a.get("bias")], "norm")
        if name == "prelu":
            if self._shape(a["weight"]) in ((), (1,)):
                return x
            return self._norm_params(x, 1, [a["weight"]], "norm")
        if name in POOL:
            if isinstance(x, (Feature, Heads)):
                self._require(x, 1, name)
            return x
        if name in RESHAPES:
            return self._reshape(node, x)
        if name == "flatten":
            return self._flatten(node, x, a["start_dim"], a["end_dim"])
        if name in ("transpose", "permute", "expand", "unflatten"):
            return self._move(node, name, x)
        if name == "t":
            return self._move_t(node, x)
        if name == "slice":
            return self._slice(node, x, a)
        if name == "select":
            return self._select(node, x, int(a["dim"]), int(a["index"]))
        if name == "cat":
            return self._cat(node, a["tensors"], int(a["dim"]))
        if name in ("split", "split_with_sizes", "chunk", "unsafe_split"):
            return self._chunks(node, x, name)
        if name == "unbind" and isinstance(x, Packed):
            dim = int(a["dim"]) % len(self._in_shape(node))
            return tuple(self._packed_select(x, dim, i) for i in range(x.pieces))
        if name in REDUCTIONS:
            return self._reduce(node)
        if name == "scaled_dot_product_attention":
            q, k, v = (value(a[n]) for n in ("query", "key", "value"))
            return self._attention_heads(node, q, k, v, bool(a.get("enable_gqa", False)))
        inputs = [v for v in _tensor_values(node, self.values)]
        if not any(isinstance(v, (Feature, Heads, Packed, Scores, tuple)) for v in inputs):
            return FIXED_TENSOR  # masks, positions, tables: no units reach it
        raise Unhandled(f"is an operation the tracer does not know (aten.{name})")

    # -- helpers ---------------------------------------------------------------------------

    def _value_of(self, arg: Any) -> Any:
        return self.values.get(arg) if isinstance(arg, fx.Node) else arg

    def _dense(self, node: fx.Node, x: Any, weight: fx.Node, bias: Any, weight_in: int) -> Any:
        """A linear map: units of ``x`` enter ``weight``'s axis ``weight_in``; new units leave
        through its other axis (and the bias) on the output's last axis."""
        shape = self._shape(weight)
        if len(shape) != 2:
            raise Unhandled("multiplies by a parameter that is not a matrix")
        ndim = len(self._shape(node))
        self._consume(x, ndim - 1, _param(weight), shape[weight_in], "Linear", weight_in)
        return self._produce(node, weight, bias, ndim - 1, 1 - weight_in)

    def _conv(self, node: fx.Node, x: Any, weight: fx.Node, bias: Any, groups: int) -> Any:
        out_channels, in_per_group = self._shape(weight)[:2]
        if groups == 1:
            self._consume(x, 1, _param(weight), in_per_group, "conv", 1)
            return self._produce(node, weight, bias, 1, 0)
        if groups == out_channels and in_per_group == 1:
            feature = self._require(x, 1, "depthwise conv")
            if feature is None or feature.length != out_channels:
                return FIXED_TENSOR
            return self._norm_params(feature, 1, [weight, bias], "norm")
        raise Unhandled(f"is a grouped conv (groups={groups})")

    def _produce(self, node: fx.Node, weight: fx.Node, bias: Any, axis: int, weight_axis: int):
        """New units on ``axis`` of the output, made by ``weight``'s ``weight_axis`` and bias."""
        size = self._shape(weight)[weight_axis]
        element = self.units.new(size)
        self.members.append((element, AxisSlice(_param(weight), weight_axis, 0, size, "out")))
        output = Feature(axis, [(element, size)])
        if isinstance(bias, fx.Node):
            if isinstance(self.values.get(bias), ParamValue) and bias.op == "get_attr":
                self.members.append((element, AxisSlice(_param(bias), 0, 0, size, "out")))
            else:  # a slice of a packed bias (nn.MultiheadAttention's): it cannot move with them
                self._fix(output, f"{_describe_aten(node)} adds a bias that is not a parameter")
        return output

    def _norm_params(
        self,
        x: Any,
        axis: int,
        params: list[Any],
        role: str,
        producer: str | None = None,
        eps: float | None = None,
    ) -> Any:
        feature = self._require(x, axis, "norm")
        if feature is None:
            return FIXED_TENSOR
        for param in params:
            if isinstance(param, fx.Node) and isinstance(self.values.get(param), ParamValue):
                self._member(feature, _param(param), 0, role, producer, eps if producer else None)
        return feature

    def _dense_producer(self, source: Any) -> str | None:
        """The layer (tensor prefix) whose output only this BatchNorm reads, for CCA's fold."""
        if not isinstance(source, fx.Node) or len(source.users) != 1 or not is_aten(source.target):
            return None
        name = source.target.overloadpacket.__name__
        if name not in ("linear", "conv1d", "conv2d", "conv3d", "convolution"):
            return None
        weight = source.args[1]
        if name == "convolution" and source.args[6]:
            return None
        groups = (
            source.args[8]
            if name == "convolution"
            else (source.args[6] if len(source.args) > 6 else 1)
        )
        if groups != 1 or not isinstance(weight, fx.Node):
            return None
        prefix, _, leaf = _param(weight).rpartition(".")
        return f"{prefix}." if leaf == "weight" else None

    def _move_t(self, node: fx.Node, x: Any) -> Any:
        if isinstance(x, Feature):
            return x.at(1 - x.axis) if len(self._in_shape(node)) == 2 else x
        if isinstance(x, Heads):
            raise Unhandled("transposes attention heads")
        return x

    def _slice(self, node: fx.Node, x: Any, a: dict[str, Any]) -> Any:
        shape = self._in_shape(node)
        dim = int(a["dim"]) % len(shape)
        start = a.get("start") or 0
        end = a.get("end")
        step = a.get("step") or 1
        whole = start == 0 and (end is None or end >= shape[dim]) and step == 1
        if isinstance(x, Heads):
            return self._heads_slice(x, dim, whole)
        if isinstance(x, Feature) and dim == x.axis and not whole:
            raise Unhandled("selects some units only")
        return x

    def _select(self, node: fx.Node, x: Any, dim: int, index: int = 0) -> Any:
        dim %= len(self._in_shape(node))
        if isinstance(x, Packed):
            return self._packed_select(x, dim, index)
        if isinstance(x, Heads):
            return self._heads_select(x, dim, index)
        if not isinstance(x, Feature):
            return x
        if dim == x.axis:
            raise Unhandled("selects some units only")
        return x.at(x.axis - (dim < x.axis))


def _describe_aten(node: fx.Node) -> str:
    return f"node {node.name} ({node.target.overloadpacket.__name__})"  # type: ignore[union-attr]


def _param(node: Any) -> str:
    """The state-dict name of a parameter node (get_attr)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise Unhandled("multiplies by a tensor that is not one of the model's parameters")
    return str(node.target)


def _tensor_values(node: fx.Node, values: dict[fx.Node, Any]) -> list[Any]:
    found: list[Any] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(values.get(n)))
    return found
