"""Model architectures: built-ins, user ``package.module:factory`` plugins, loading weights."""

from mergecli.models.loading import check_fits, load_into_model
from mergecli.models.registry import argument_names, build_model, builtin_architectures

__all__ = [
    "argument_names",
    "build_model",
    "builtin_architectures",
    "check_fits",
    "load_into_model",
]
