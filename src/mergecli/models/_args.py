"""Argument checks shared by the built-in factories, so bad recipe values fail in one line."""

from __future__ import annotations

from typing import Any

from mergecli.errors import MergeCliError


def positive_int(arch: str, name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise MergeCliError."""
    # bool is an int subclass; `depth: true` in YAML is a typo, not a depth of 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MergeCliError(
            f"model.args.{name}: {arch} needs an integer >= {minimum}, got {value!r}; "
            f"set model.args.{name} to a whole number such as {max(minimum, 1)}"
        )
    return value


def positive_float(arch: str, name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a number > 0, else raise MergeCliError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise MergeCliError(
            f"model.args.{name}: {arch} needs a number > 0, got {value!r}; "
            f"set model.args.{name} to e.g. 1 or 2"
        )
    return float(value)


def boolean(arch: str, name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise MergeCliError."""
    if not isinstance(value, bool):
        raise MergeCliError(f"model.args.{name}: {arch} needs true or false, got {value!r}")
    return value


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels * width``, rounded, never below 1."""
    return max(1, round(channels * width))
