"""The math of the `merge` step, checked against independent formulas and invariants."""

from __future__ import annotations

import pytest
import torch

from mergecli.errors import MergeCliError
from mergecli.merge.average import average
from mergecli.registry import methods_of


def test_average_of_identical_models_is_the_model() -> None:
    theta = torch.randn(4, 5)
    stack = torch.stack([theta, theta, theta])
    weights = torch.tensor([0.2, 3.0, 1.0])
    torch.testing.assert_close(average(stack, weights), theta)


def test_weights_normalise() -> None:
    a, b = torch.randn(7), torch.randn(7)
    got = average(torch.stack([a, b]), torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(got, 0.25 * a + 0.75 * b)
    # Scaling every weight by the same factor changes nothing once normalised.
    scaled = average(torch.stack([a, b]), torch.tensor([10.0, 30.0]))
    torch.testing.assert_close(scaled, got)


def test_unnormalised_average_is_the_weighted_sum() -> None:
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    got = average(torch.stack([a, b]), torch.tensor([1.0, 3.0]), normalize=False)
    torch.testing.assert_close(got, a + 3 * b)


def test_endpoints_at_weights_one_and_zero() -> None:
    a, b = torch.randn(6), torch.randn(6)
    torch.testing.assert_close(average(torch.stack([a, b]), torch.tensor([1.0, 0.0])), a)
    torch.testing.assert_close(average(torch.stack([a, b]), torch.tensor([0.0, 1.0])), b)


def test_zero_weight_sum_is_refused() -> None:
    with pytest.raises(MergeCliError, match="sum to 0"):
        average(torch.stack([torch.ones(2), torch.ones(2)]), torch.tensor([1.0, -1.0]))


def test_registered_method_parameters_come_from_the_signature() -> None:
    method = methods_of("merge")["average"]
    fields = method.params.model_fields
    assert list(fields) == ["compute_dtype", "missing", "normalize"]
    assert fields["normalize"].default is True
    assert method.doc.startswith("Weighted average of the models")
