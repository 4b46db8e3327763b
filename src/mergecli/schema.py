"""The base of every pydantic model a recipe is validated against: its sections and the
parameters of every step method."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RecipeModel(BaseModel):
    """Unknown keys are errors, and so are inf and nan in any float field: `lr: .inf` would
    otherwise validate and then poison a fit (one rule for every model, not field by field)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
