"""Merge parameters that vary by tensor: the forms, how one resolves for a tensor, and the order
in which a checkpoint's, the step's and the method's default settings apply (mergekit's)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mergecli.errors import RecipeError
from mergecli.merge.parameters import (
    NO_MATCH,
    count_layers,
    first_applicable,
    layer_position,
    resolve,
    tensor_values,
)
from mergecli.registry import methods_of

NAMES = [f"model.layers.{i}.mlp.weight" for i in range(5)] + ["lm_head.weight"]


def ties_params():
    return methods_of("merge")["ties"].params


def test_parameter_values_scalar_gradient_and_filters() -> None:

    names = [f"model.layers.{i}.mlp.weight" for i in range(5)] + ["lm_head.weight"]
    assert count_layers(names) == 5
    assert layer_position("model.layers.4.mlp.weight", 5) == 1.0
    assert layer_position("lm_head.weight", 5) == 0.0
    params = methods_of("merge")["ties"].params
    gradient = params.model_validate({"density": [0.2, 1.0]}).density
    assert resolve(gradient, "model.layers.2.mlp.weight", 0.5) == pytest.approx(0.6)
    filtered = params.model_validate(
        {
            "density": [
                {"filter": "mlp", "value": 0.3},
                {"filter": "*.attn.*", "value": 0.4},
                {"value": 0.9},
            ]
        }
    ).density
    assert resolve(filtered, "model.layers.1.mlp.weight", 0.25) == 0.3
    assert resolve(filtered, "model.layers.1.attn.q.weight", 0.25) == 0.4
    assert resolve(filtered, "lm_head.weight", 0.0) == 0.9
    # Bounds hold for every form, and `lambda` is the recipe's name for the scale.
    for bad in (1.5, [0.5, 1.5], [{"value": 0}]):
        with pytest.raises(ValueError):
            params.model_validate({"density": bad})
    assert params.model_validate({"lambda": [0.5, 1.0]}).lam == [0.5, 1.0]


def test_a_lone_filter_entry_is_a_list_of_one() -> None:
    # As mergekit 0.1.5 reads `density: {filter: mlp, value: 0.3}`.
    density = ties_params().model_validate({"density": {"filter": "mlp", "value": 0.3}}).density
    assert resolve(density, "model.layers.0.mlp.weight", 0.0) == 0.3
    assert resolve(density, "lm_head.weight", 0.0) is NO_MATCH


def test_a_filter_value_may_be_a_gradient() -> None:
    density = (
        ties_params()
        .model_validate({"density": [{"filter": "mlp", "value": [0.2, 1.0]}, {"value": 0.5}]})
        .density
    )
    assert resolve(density, "model.layers.2.mlp.weight", 0.5) == pytest.approx(0.6)
    assert resolve(density, "model.layers.4.mlp.weight", 1.0) == pytest.approx(1.0)
    assert resolve(density, "lm_head.weight", 0.0) == 0.5


def test_the_form_is_told_from_the_shape_of_the_value() -> None:
    params = ties_params()
    for bad, message in (
        ([0.5, {"value": 1.0}], "expected a number, a list of numbers"),
        ([], "at least 1 item"),
        ([{"filter": "mlp", "value": {"value": 1.0}}], "a filter's value is a number or a list"),
        ([{"filter": "mlp", "value": [[0.5]]}], "a filter's value is a number or a list"),
    ):
        with pytest.raises(ValidationError, match=message) as info:
            params.model_validate({"density": bad})
        assert len(info.value.errors()) == 1, info.value.errors()


def test_a_list_of_filters_that_matches_nothing_gives_way() -> None:
    filters = ties_params().model_validate({"density": [{"filter": "attn", "value": 0.3}]}).density
    assert resolve(filters, "model.layers.0.mlp.weight", 0.0) is NO_MATCH
    # The checkpoint's own setting, then the step's, then the method's default (mergekit).
    assert first_applicable([filters, 0.7, 1.0], "model.layers.0.mlp.weight", 0.0) == 0.7
    assert first_applicable([filters, NO_MATCH, 1.0], "x.attn.weight", 0.0) == 0.3
    assert first_applicable([filters, filters], "lm_head.weight", 0.0) is NO_MATCH
    # None is a value like any other (a user's `x: float | None = None`), not "no match".
    assert first_applicable([None, 0.5], "lm_head.weight", 0.0) is None


def test_tensor_values_per_model_and_without_default() -> None:
    params = ties_params()
    own = params.model_validate({"density": [{"filter": "layers.0.", "value": 0.2}]}).density
    step = params.model_validate({"density": [{"filter": "layers.1.", "value": 0.4}]}).density
    table = tensor_values(
        NAMES, 5, {"density": step}, {"density": 1.0}, {"density": [own, NO_MATCH]}
    )
    assert table[NAMES[0]]["density"] == [0.2, 1.0]
    assert table[NAMES[1]]["density"] == [0.4, 0.4]
    assert table["lm_head.weight"]["density"] == [1.0, 1.0]
    with pytest.raises(
        RecipeError, match="density: no filter entry matches tensor 'model.layers.0"
    ):
        tensor_values(NAMES, 5, {"density": step}, {}, {})


def test_an_unvalidated_filter_list_is_a_bug_not_a_gradient() -> None:
    # The bug this guards: a dumped filter entry (a dict) read as a gradient point.
    with pytest.raises(TypeError, match="unvalidated"):
        resolve([{"filter": "mlp", "value": 0.3}, {"value": 0.7}], "mlp.weight", 0.0)
