"""mergecli: merge neural networks from YAML recipes."""

__version__ = "0.1.0"
