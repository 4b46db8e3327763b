"""Merge methods; importing this package registers them (one module per method)."""

from mergecli.merge import average, slerp, task_arithmetic  # noqa: F401
