"""The registry of step methods: one decorator per operation, looked up by (kind, method)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from mergecli.errors import MergeCliError
from mergecli.recipe.schema import StepParams
from mergecli.user_code import import_object

if TYPE_CHECKING:
    from mergecli.state import MergeState

# Each kind is a package, `mergecli.KIND`, that says whether its methods change the merged
# weights (CHANGES_WEIGHTS) and which of its modules register them (METHOD_MODULES).
STEP_KINDS = ("align", "fit", "merge", "repair", "evaluate", "analyze")


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
        if (kind, name) in _METHODS:
            raise MergeCliError(
                f"{kind} method '{name}' is registered twice (again by {fn.__module__}); give "
                "your method a name of its own"
            )
        _METHODS[(kind, name)] = StepMethod(
            kind, name, fn, params, frozenset(needs), doc, default, per_model
        )
        mark_registered(fn, kind, name)
        return fn

    return register


def mark_registered(fn: Callable[..., Any], kind: str, name: str) -> None:
    """Remember on ``fn`` which method it is, so a recipe can name it by its import path."""
    fn.__mergecli_method__ = (kind, name)  # type: ignore[attr-defined]


def user_method(kind: str, reference: str, key: str) -> StepMethod:
    """The user's method that ``reference`` (``package.module:function``) names, registered
    with `step_method` (or `merge_method`) when its module is imported; ``key`` is the recipe
    key that named it. It is then known by ``reference`` too."""
    if (kind, reference) in _METHODS:
        return _METHODS[(kind, reference)]
    fn = import_object(
        reference, key, form="package.module:function", example=f"mypkg.methods:my_{kind}"
    )
    registered = getattr(fn, "__mergecli_method__", None)
    if registered is None or registered not in _METHODS:
        decorator = "@merge_method(NAME)" if kind == "merge" else f'@step_method("{kind}", NAME)'
        raise MergeCliError(
            f"{key} '{reference}': not a registered method; decorate it with {decorator} "
            "(see README, Writing your own method)"
        )
    if registered[0] != kind:
        raise MergeCliError(
            f"{key} '{reference}': a {registered[0]} method, not a {kind} method; use it in a "
            f"`{registered[0]}` step"
        )
    method = replace(_METHODS[registered], name=reference)
    _METHODS[(kind, reference)] = method
    return method


def load_builtin_methods() -> None:
    """Import the modules that register the built-in methods (idempotent)."""
    for kind in STEP_KINDS:
        for module in importlib.import_module(f"mergecli.{kind}").METHOD_MODULES:
            importlib.import_module(module)


def changes_weights(kind: str) -> bool:
    """Whether the methods of step ``kind`` shape the merged weights."""
    return bool(importlib.import_module(f"mergecli.{kind}").CHANGES_WEIGHTS)


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
