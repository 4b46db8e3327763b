"""Resumable state as safetensors plus JSON: an optimizer's state split into named tensors and
plain values, and joined again. Never a pickle: loading one runs whatever code it names."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def split_optimizer(
    state: dict[str, Any], prefix: str = "optimizer"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An ``optimizer.state_dict()`` as (tensors, JSON-able plain values): each per-parameter
    tensor is named ``<prefix>.state.<param>.<key>`` and referred to as ``{"tensor": name}``."""
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        plain[str(index)] = {}
        for key, value in values.items():
            if isinstance(value, Tensor):
                name = f"{prefix}.state.{index}.{key}"
                tensors[name] = value
                value = {"tensor": name}
            plain[str(index)][key] = value
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def join_optimizer(plain: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """The ``optimizer.state_dict()`` that ``split_optimizer`` split, whole again."""
    return {
        "state": {
            int(index): {
                key: tensors[value["tensor"]] if isinstance(value, dict) else value
                for key, value in values.items()
            }
            for index, values in plain["state"].items()
        },
        # JSON has no tuples: Adam's betas come back as lists otherwise.
        "param_groups": [
            {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
            for g in plain["param_groups"]
        ],
    }
