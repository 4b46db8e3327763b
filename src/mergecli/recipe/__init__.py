"""The recipe: its schema, loading with `--set` overrides, and problems as `file:line` lines."""

from mergecli.recipe.load import apply_overrides, load_recipe, validate_recipe
from mergecli.recipe.schema import (
    CheckpointSpec,
    DataSection,
    DataSpec,
    LoadedRecipe,
    ModelSpec,
    OutputSpec,
    Recipe,
    RecipeModel,
    SlurmSpec,
    StepParams,
    StepSpec,
)

__all__ = [
    "CheckpointSpec",
    "DataSection",
    "DataSpec",
    "LoadedRecipe",
    "ModelSpec",
    "OutputSpec",
    "Recipe",
    "RecipeModel",
    "SlurmSpec",
    "StepParams",
    "StepSpec",
    "apply_overrides",
    "load_recipe",
    "validate_recipe",
]
