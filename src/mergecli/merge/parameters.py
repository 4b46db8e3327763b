"""Merge parameters that vary by tensor: a scalar, a gradient over depth, or filters.

A value is a scalar; a list of scalars (a gradient: interpolated linearly over the layer index
found in the tensor's name, from the first layer at the list's start to the last at its end;
tensors outside the layers take the first value); or a list of ``{filter, value}`` where the
first entry whose filter matches the tensor name wins (a substring, or a glob with * ? [];
no filter matches everything) and whose value is a scalar or a gradient (a lone entry is a
list of one). These are the forms
mergekit recipes use (mergekit 0.1.5, ``config.evaluate_setting``). A list of filters that
no entry of matches a tensor gives no value there: the next setting applies, as in mergekit's
``ConfigReader.parameter`` (a checkpoint's own, then the step's, then the method's default).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    create_model,
    model_serializer,
)

from mergecli.errors import RecipeError
from mergecli.recipe.schema import RecipeModel

LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")
# What a list of filters gives a tensor that none of its entries matches (None may be a value).
NO_MATCH: Any = type("NoMatch", (), {"__repr__": lambda self: "NO_MATCH"})()
FORMS = "a number, a list of numbers (a gradient over the layers) or a list of {filter, value}"


class FilterEntry(RecipeModel):
    """One ``{filter, value}`` entry; unknown keys and inf/nan are errors, as in every step."""

    filter: str | None = None

    @model_serializer(mode="wrap")
    def _without_empty_filter(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The resolved recipe writes a catch-all entry as the user did: `{value: 0.7}`.
        data = handler(self)
        if data.get("filter") is None:
            data.pop("filter", None)
        return data


def varying(name: str, annotation: Any) -> Any:
    """The annotation ``T | list[T] | list[{filter, value}]`` for a parameter of type ``T``.

    The form is chosen from the input's shape before validating, so an error is about that
    form alone (an unknown key in a filter entry, a value that is not a number) rather than
    one error per form pydantic tried.
    """
    gradient = Annotated[list[annotation], Field(min_length=1)]
    value = Annotated[
        Annotated[annotation, Tag("scalar")] | Annotated[gradient, Tag("gradient")],
        Discriminator(
            _value_form,
            custom_error_type="value_form",
            custom_error_message="a filter's value is a number or a list of numbers (a gradient)",
        ),
    ]
    entry = create_model(f"{name}_filter", __base__=FilterEntry, value=(value, ...))
    # A lone {filter, value} is a list of one, as mergekit 0.1.5 reads it.
    filters = Annotated[
        list[entry],  # type: ignore[valid-type]
        BeforeValidator(lambda v: [v] if isinstance(v, dict) else v),
        Field(min_length=1),
    ]
    return Annotated[
        Annotated[annotation, Tag("scalar")]
        | Annotated[gradient, Tag("gradient")]
        | Annotated[filters, Tag("filters")],
        Discriminator(
            _form, custom_error_type="parameter_form", custom_error_message=f"expected {FORMS}"
        ),
    ]


def _is_entry(item: Any) -> bool:
    return isinstance(item, (dict, BaseModel))


def _form(value: Any) -> str | None:
    """Which form ``value`` is written in; None (an error) for a list that mixes numbers and
    filter entries."""
    if isinstance(value, list):
        if value and all(_is_entry(item) for item in value):
            return "filters"
        return None if any(_is_entry(item) for item in value) else "gradient"
    return "filters" if _is_entry(value) else "scalar"


def _value_form(value: Any) -> str | None:
    """A filter's value: a scalar or a gradient (no nested filters, as in mergekit)."""
    if isinstance(value, list):
        return (
            None if any(_is_entry(item) or isinstance(item, list) for item in value) else "gradient"
        )
    return None if _is_entry(value) else "scalar"


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
    """The scalar a (possibly varying) parameter takes for one tensor; ``NO_MATCH`` where it
    is a list of filters none of which matches the tensor."""
    if not isinstance(value, list):
        return value
    if value and isinstance(value[0], BaseModel):
        for entry in value:
            if _matches(entry.filter, tensor_name):
                return resolve(entry.value, tensor_name, position)
        return NO_MATCH
    if any(isinstance(v, (dict, list)) for v in value):
        # Validation turns filter entries into models; a plain dict here is a bug upstream,
        # which must not be read as a gradient.
        raise TypeError(f"unvalidated parameter value {value!r}")
    scaled = position * (len(value) - 1)
    low = int(scaled)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return value[low]
    high = min(len(value) - 1, low + 1)
    fraction = scaled - low
    return (1 - fraction) * value[low] + fraction * value[high]


def first_applicable(settings: list[Any], tensor_name: str, position: float) -> Any:
    """The value of the first setting (most specific first) that applies to the tensor;
    ``NO_MATCH`` when none does."""
    for setting in settings:
        value = resolve(setting, tensor_name, position)
        if value is not NO_MATCH:
            return value
    return NO_MATCH


def _matches(pattern: str | None, tensor_name: str) -> bool:
    if pattern is None or pattern == "*":
        return True
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(tensor_name, pattern)
    return pattern in tensor_name


def tensor_values(
    names: list[str],
    layers: int,
    step: dict[str, Any],
    defaults: dict[str, Any],
    own: dict[str, list[Any]],
) -> dict[str, dict[str, Any]]:
    """Every tensor's parameter values, worked out before any tensor is merged.

    A key takes the step's setting, else the method's default; a key that checkpoints set for
    themselves (``own``: one setting per model, ``NO_MATCH`` where a model sets none) takes one
    value per model: the model's setting, else the step's, else the default. A tensor that
    none of these applies to is a recipe error (a list of filters without a catch-all entry for
    a parameter the method has no default for).
    """
    table = {}
    for name in names:
        position = layer_position(name, layers)
        values: dict[str, Any] = {}
        for key, setting in step.items():
            chain = [setting, defaults.get(key, NO_MATCH)]
            if key in own:
                values[key] = [
                    first_applicable([mine, *chain], name, position) for mine in own[key]
                ]
            else:
                values[key] = first_applicable(chain, name, position)
        unset = [
            key
            for key, value in values.items()
            if value is NO_MATCH or (isinstance(value, list) and any(v is NO_MATCH for v in value))
        ]
        if unset:
            raise RecipeError(
                [
                    f"{', '.join(unset)}: no filter entry matches tensor '{name}' and the method "
                    "has no default; add an entry without `filter` as the last one"
                ]
            )
        table[name] = values
    return table


def tensor_weights(
    names: list[str], layers: int, weights: dict[int, Any]
) -> dict[str, list[float]]:
    """Every tensor's model weights, in the order of ``weights`` (by the checkpoint's index in
    the recipe): a checkpoint's number, or its weight at that tensor where it varies (a
    gradient over the layers, or filters: the first entry that matches). A tensor that a
    checkpoint's filters leave without a weight is a recipe error, found here, before any
    tensor is merged."""
    table = {}
    for name in names:
        position = layer_position(name, layers)
        values = [resolve(w, name, position) for w in weights.values()]
        if any(v is NO_MATCH for v in values):
            index = next(i for i, v in zip(weights, values, strict=True) if v is NO_MATCH)
            raise RecipeError(
                [
                    f"checkpoints.{index}.weight: no filter entry matches tensor '{name}'; add "
                    "an entry without `filter` as the last one (the weight elsewhere)"
                ]
            )
        table[name] = [float(v) for v in values]
    return table
