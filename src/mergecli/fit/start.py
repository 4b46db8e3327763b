"""Where a fit over task vectors starts: a data-free merge, written as coefficients.

Task arithmetic, averaging and TIES all merge fine-tunes of one base as
base + sum_i c_i * (theta_i - base): task arithmetic with c_i = lambda w_i, averaging with
c_i = w_i / sum_j w_j, TIES with c_i = lambda w_i m_i / sum_j w_j m_j per entry (m_i: model i's
entry survives the trim and agrees with the elected sign). The fit learns c_i = c0_i + delta_i
from delta = 0, so it starts at the named merge (computed by that merge's own code).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from mergecli.merge.parameters import count_layers, tensor_values
from mergecli.merge.step import MergeOptions
from mergecli.state import StateDict

START_METHODS = ("task_arithmetic", "ties", "average")
DEFAULT_START = "task_arithmetic"


def start_params_model(method: str) -> type:
    """The named merge's own parameter model: `start_params` take its keys (`lambda`,
    `density`, `normalize`), validated as the merge step validates them."""
    import mergecli.merge  # noqa: F401  (registers the merge methods)
    from mergecli.registry import methods_of

    return methods_of("merge")[method].params


def start_problems(method: str, raw: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """What is wrong with ``start_params`` for ``method``: (key path, message) pairs."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for key in raw:
        if key in MergeOptions.model_fields:
            problems.append((("start_params", key), f"not a parameter of the start merge {method}"))
    if problems:
        return problems
    try:
        params = start_params_model(method).model_validate(dict(raw))
    except ValidationError as exc:
        model = start_params_model(method)
        own = [
            f.alias or n
            for n, f in model.model_fields.items()
            if n not in MergeOptions.model_fields
        ]
        for error in exc.errors():
            message = error["msg"]
            if error["type"] == "extra_forbidden":
                message = (
                    f"not a parameter of {method}, the start merge (its parameters: "
                    f"{', '.join(own) or 'none'})"
                )
            problems.append((("start_params", *_keys(raw, error["loc"])), message))
        return problems
    if method == "average" and not params.normalize:
        problems.append(
            (("start_params", "normalize"),
             "average without normalize is not base + sum_i c_i (theta_i - base); drop it")
        )  # fmt: skip
    return problems


def _keys(raw: Any, loc: tuple) -> list[str | int]:
    """The part of a pydantic error location that is keys of the recipe (without the tags of
    the forms a varying value may take)."""
    keys: list[str | int] = []
    for part in loc:
        if (
            isinstance(raw, dict)
            and part in raw
            or isinstance(raw, list)
            and (isinstance(part, int) and part < len(raw))
        ):
            keys.append(part)
            raw = raw[part]
    return keys


def start_values(method: str, raw: Mapping[str, Any], names: list[str]) -> dict[str, dict]:
    """Every tensor's parameter values for the start merge (they may vary by tensor, as in a
    merge step: a gradient over the layers or filters)."""
    params = start_params_model(method).model_validate(dict(raw))
    fields = type(params).model_fields
    values = {k: getattr(params, k) for k in fields if k not in MergeOptions.model_fields}
    defaults = {k: fields[k].default for k in values if not fields[k].is_required()}
    return tensor_values(names, count_layers(names), values, defaults, {})


@dataclass
class Start:
    """The start merge (by the merge method's own function, float32) and its coefficients c0
    per tensor: (N,) or (N, *shape) (TIES), to be broadcast over the (N, *shape) task vectors."""

    merged: StateDict
    coefficients: dict[str, Tensor]


def start_merge(
    method: str,
    raw: Mapping[str, Any],
    base: Mapping[str, Tensor],
    models: Sequence[Mapping[str, Tensor]],
    weights: Tensor,
    names: list[str],
) -> Start:
    """The merge named ``method`` of ``models`` over ``base``, and the same as coefficients."""
    from mergecli.merge.average import average
    from mergecli.merge.task_arithmetic import task_arithmetic, ties, ties_coefficients

    table = start_values(method, raw, names)
    merged, coefficients = {}, {}
    for name in names:
        stack = torch.stack([m[name].float() for m in models])
        theta = base[name].float()
        values = table[name]
        if method == "ties":
            merged[name] = ties(stack.clone(), weights, theta, **values)
            coefficients[name] = ties_coefficients(stack, weights, theta, **values)
        elif method == "task_arithmetic":
            merged[name] = task_arithmetic(stack, weights, theta, **values)
            total = weights.sum() if values["normalize"] else torch.ones(())
            # combine_task_vectors's guard against a sum of 0
            total = total if total.abs() >= 1e-8 else torch.ones_like(total)
            coefficients[name] = values["lam"] * weights / total
        else:
            merged[name] = average(stack, weights, **values)
            coefficients[name] = weights / weights.sum()
    return Start(merged, coefficients)


def broadcastable(c: Tensor, dims: int) -> Tensor:
    """``c`` (N, ...) with trailing singleton axes up to ``dims`` axes: a coefficient saved per
    model (N,), row (N, rows) or entry (N, *shape) broadcasts over the (N, *shape) stack."""
    return c.reshape(*c.shape, *([1] * (dims - c.dim())))


def compact(c: Tensor) -> Tensor:
    """``c`` without trailing singleton axes after the first (model) axis: how it is saved."""
    shape = list(c.shape)
    while len(shape) > 1 and shape[-1] == 1:
        shape.pop()
    return c.reshape(shape)


def apply_task_vectors(
    base: Mapping[str, Tensor],
    models: Sequence[Mapping[str, Tensor]],
    coefficients: Mapping[str, Tensor],
    names: list[str],
) -> StateDict:
    """base + sum_i c_i * (theta_i - base) per tensor, in float32: the fit's output and what
    `fit.from` re-applies (the same function, so a re-applied file gives the same bits)."""
    merged = {}
    for name in names:
        theta = base[name].float()
        vectors = torch.stack([m[name].float() for m in models]) - theta
        c = broadcastable(coefficients[name].float(), vectors.dim())
        merged[name] = theta + (c * vectors).sum(dim=0)
    return merged


class TaskVectors(Mapping):
    """theta_i - base per tensor (float32), computed when read: a row of the fit's stack."""

    def __init__(self, model: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> None:
        self.model, self.base = model, base

    def __getitem__(self, name: str) -> Tensor:
        return self.model[name].float() - self.base[name].float()

    def __iter__(self):
        return iter(self.model)

    def __len__(self) -> int:
        return len(self.model)
