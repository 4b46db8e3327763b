"""What the spec tracer knows of torch's operations: which pass units through unchanged.

Modules, functions and tensor methods not named here (nor handled by a rule of their own in
``align.spec``) are unknown: the units reaching them are left unpermuted, with a warning.
"""

from __future__ import annotations

import operator

import torch
from torch import nn

PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    # Padding modules pad the trailing (spatial) axes only.
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d,
    nn.CircularPad2d, nn.CircularPad3d,
)  # fmt: skip
PASS_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.relu, torch.nn.functional.gelu,
    torch.nn.functional.silu, torch.nn.functional.leaky_relu, torch.nn.functional.elu,
    torch.nn.functional.dropout, torch.nn.functional.relu6, torch.nn.functional.hardswish,
    torch.nn.functional.mish, torch.nn.functional.softplus, torch.nn.functional.sigmoid,
    torch.nn.functional.tanh, operator.neg, torch.abs, torch.clone,
}  # fmt: skip
POOL_FUNCTIONS = {
    torch.nn.functional.max_pool1d, torch.nn.functional.max_pool2d,
    torch.nn.functional.max_pool3d, torch.nn.functional.avg_pool1d,
    torch.nn.functional.avg_pool2d, torch.nn.functional.avg_pool3d,
    torch.nn.functional.adaptive_avg_pool1d, torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.adaptive_avg_pool3d, torch.nn.functional.adaptive_max_pool2d,
    torch.nn.functional.interpolate, torch.nn.functional.upsample,
}  # fmt: skip
PASS_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "double", "half",
    "to", "type_as", "detach", "abs", "neg",
}  # fmt: skip
ELEMENTWISE = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
}  # fmt: skip
ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
REDUCTIONS = {"mean", "sum", "amax", "amin"}
