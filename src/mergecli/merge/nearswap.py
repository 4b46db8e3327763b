"""NearSwap: take the other model's weights where they are near the base's."""

from __future__ import annotations

from typing import Annotated

import annotated_types
from torch import Tensor

from mergecli.errors import MergeCliError
from mergecli.merge.step import merge_method


def one_model(n: int, has_base: bool) -> str | None:
    """NearSwap compares one model with the base (a recipe without one is told so by the base
    check)."""
    if not has_base or n == 1:
        return None
    return f"merge nearswap: needs exactly one model besides the base, got {n}"


@merge_method("nearswap", needs_base=True, model_count=one_model)
def nearswap(
    models: Tensor,
    weights: Tensor,
    base: Tensor,
    t: Annotated[float, annotated_types.Ge(0)],
) -> Tensor:
    """NearSwap (Gregor, alchemonaut/QuartetAnemoi-70B-t0.0001) entry by entry.

    w = clamp(t / |base - theta|, 0, 1), result = w theta + (1 - w) base: an entry within t of
    the base's is the other model's, one further away moves towards it by t / |difference|.
    |difference| is clamped at 1e-6 as in mergekit 0.1.5 (equal entries are equal either way).
    """
    if problem := one_model(len(models), True):
        raise MergeCliError(problem)
    other = models[0]
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * other + (1 - weight) * base
