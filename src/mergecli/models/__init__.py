"""Model architectures: built-ins, user ``package.module:factory`` plugins, loading weights."""

from mergecli.models.loading import load_into_model
from mergecli.models.registry import build_model, builtin_architectures

__all__ = ["build_model", "builtin_architectures", "load_into_model"]
