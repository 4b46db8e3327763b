"""The registry of step methods: one decorator per operation, looked up by (kind, method)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergecli.recipe.schema import StepParams

if TYPE_CHECKING:
    from mergecli.state import MergeState

STEP_KINDS = ("align", "fit", "merge", "repair", "evaluate", "analyze")

# Modules whose import registers the built-in methods; later issues add theirs here.
BUILTIN_METHOD_MODULES = (
    "mergecli.align.step",
    "mergecli.merge",
    "mergecli.merge.fit",
    "mergecli.evaluate.step",
    "mergecli.merge.repair",
    "mergecli.analyze",
)


@dataclass(frozen=True)
class StepMethod:
    """One registered operation: what it is called, what it accepts, what it needs."""

    kind: str
    name: str
    run: Callable[[MergeState, Any], None]
    params: type[StepParams]
    needs: frozenset[str]
    doc: str
    default: bool
    # Parameters a checkpoint may set for itself (`checkpoints[].parameters`), e.g. density.
    per_model: tuple[str, ...] = ()


_METHODS: dict[tuple[str, str], StepMethod] = {}


def step_method(
    kind: str,
    name: str,
    params: type[StepParams] = StepParams,
    needs: tuple[str, ...] = (),
    default: bool = False,
    per_model: tuple[str, ...] = (),
) -> Callable[[Callable[[MergeState, Any], None]], Callable[[MergeState, Any], None]]:
    """Register ``fn(state, params)`` as method ``name`` of step ``kind``.

    ``needs`` names what the recipe must provide: ``model``, ``data.fit``, ``data.eval``, ``base``.
    ``default`` marks the method used when a step gives no ``method:``.
    """
    if kind not in STEP_KINDS:
        raise ValueError(f"unknown step kind {kind!r}")

    def register(fn: Callable[[MergeState, Any], None]) -> Callable[[MergeState, Any], None]:
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _METHODS[(kind, name)] = StepMethod(
            kind, name, fn, params, frozenset(needs), doc, default, per_model
        )
        return fn

    return register


def load_builtin_methods() -> None:
    """Import the modules that register the built-in methods (idempotent)."""
    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(module)


def methods_of(kind: str) -> dict[str, StepMethod]:
    """The registered methods of one step kind, by name."""
    load_builtin_methods()
    return {name: m for (k, name), m in sorted(_METHODS.items()) if k == kind}


def all_methods() -> list[StepMethod]:
    """Every registered method, ordered by kind as steps usually run, then by name."""
    load_builtin_methods()
    order = {kind: i for i, kind in enumerate(STEP_KINDS)}
    return sorted(_METHODS.values(), key=lambda m: (order[m.kind], m.name))


def default_method(kind: str) -> str | None:
    """The method a step of this kind runs when the recipe names none."""
    defaults = [name for name, m in methods_of(kind).items() if m.default]
    return defaults[0] if defaults else None
