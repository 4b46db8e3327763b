"""Merge parameters that vary by tensor: a scalar, a gradient over depth, or filters.

A value is a scalar; a list of scalars (a gradient: interpolated linearly over the layer index
found in the tensor's name, from the first layer at the list's start to the last at its end;
tensors outside the layers take the first value); or a list of ``{filter, value}`` where the
first entry whose filter matches the tensor name wins (a substring, or a glob with * ? [];
no filter matches everything). These are the forms mergekit recipes use.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from pydantic import BaseModel, create_model

from mergecli.recipe.schema import RecipeModel

LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")


def varying(name: str, annotation: Any) -> Any:
    """The annotation ``T | list[T] | list[{filter, value}]`` for a parameter of type ``T``."""
    entry = create_model(
        f"{name}_filter",
        __base__=RecipeModel,  # unknown keys and inf/nan are errors, as in every step
        filter=(str | None, None),
        value=(annotation | list[annotation], ...),
    )
    return annotation | list[annotation] | list[entry]


def layer_position(tensor_name: str, layers: int) -> float:
    """Where a tensor sits in depth, 0 (first layer) to 1 (last); 0 outside the layers."""
    match = LAYER_INDEX.search(tensor_name)
    if match is None or layers <= 1:
        return 0.0
    return int(match.group(1)) / (layers - 1)


def count_layers(tensor_names: list[str]) -> int:
    """Number of layers: one more than the largest layer index in the names."""
    indices = [int(m.group(1)) for n in tensor_names if (m := LAYER_INDEX.search(n))]
    return max(indices) + 1 if indices else 0


def resolve(value: Any, tensor_name: str, position: float) -> Any:
    """The scalar a (possibly varying) parameter takes for one tensor."""
    if isinstance(value, list):
        if not value:
            return None
        if isinstance(value[0], BaseModel):
            for entry in value:
                if _matches(entry.filter, tensor_name):
                    return resolve(entry.value, tensor_name, position)
            return None
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        scaled = position * (len(value) - 1)
        low = int(scaled)
        if not numeric:
            return value[low]
        high = min(len(value) - 1, low + 1)
        fraction = scaled - low
        return (1 - fraction) * value[low] + fraction * value[high]
    return value


def _matches(pattern: str | None, tensor_name: str) -> bool:
    if pattern is None or pattern == "*":
        return True
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(tensor_name, pattern)
    return pattern in tensor_name
