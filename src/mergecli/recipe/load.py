"""Loading a recipe: YAML with the line of every key, the short forms, `--set` overrides, then
validation of the top level and of each step against its registered method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mergecli.errors import MergeCliError, Problem, RecipeError
from mergecli.recipe.problems import Locator, unknown_name, validation_problems
from mergecli.recipe.schema import LoadedRecipe, Recipe, StepSpec
from mergecli.recipe.yaml_lines import Path_, load_yaml_with_lines
from mergecli.user_code import is_reference


def load_recipe(
    path: str | Path,
    overrides: list[str] | None = None,
    needs_checkpoints: bool = True,
    out: str | None = None,
) -> LoadedRecipe:
    """Read, override, validate and resolve a recipe; raise RecipeError listing every problem.
    ``needs_checkpoints=False`` accepts a recipe without checkpoints (a model to preview); a
    mergekit config (top-level `merge_method:`) is translated first; ``out`` is output.dir."""
    path = Path(path)
    data, where = read_recipe(path, overrides, out)
    return validate_recipe(data, where, default_name=path.stem, needs_checkpoints=needs_checkpoints)


def read_recipe(
    path: Path, overrides: list[str] | None = None, out: str | None = None
) -> tuple[dict[str, Any], Locator]:
    """The recipe's mapping (a mergekit config translated) with overrides applied, and where
    each of its keys stands in the file."""
    from mergecli.recipe.mergekit import MergekitLocator, is_mergekit_config, translate

    filename = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError([Problem("no such recipe file", filename)]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([Problem(f"cannot read the recipe ({exc})", filename)]) from None
    data, lines = load_yaml_with_lines(text, filename)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            [Problem("the recipe must be a mapping of keys (version, ...)", filename, 1)]
        )
    origin = None
    if is_mergekit_config(data):
        data, origin = translate(data, path, lines, out)
    elif out is not None:
        output = data.get("output")
        data["output"] = {**output, "dir": out} if isinstance(output, dict) else {"dir": out}
    _expand_method_names(data)
    overridden = apply_overrides(data, overrides or [])
    _expand_method_names(data)  # an override may itself be short: `--set steps.1.merge=ties`
    if origin is not None:
        return data, MergekitLocator(filename, lines, overridden, origin)
    return data, Locator(filename, lines, overridden)


def _expand_method_names(data: dict[str, Any]) -> None:
    """``- merge: ties`` is short for ``- merge: {method: ties}``, expanded before overrides
    so that ``--set steps.0.merge.density=0.3`` finds a mapping."""
    steps = data.get("steps")
    for step in steps if isinstance(steps, list) else []:
        if isinstance(step, dict) and len(step) == 1:
            kind, body = next(iter(step.items()))
            if isinstance(body, str):
                step[kind] = {"method": body}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> set[Path_]:
    """Apply ``dotted.key=value`` overrides in place (values parsed as YAML); return their paths."""
    applied: set[Path_] = set()
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise RecipeError([_set_problem(override, "expected dotted.key=value")])
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            node = _descend(node, part, key, create=isinstance(parts[i + 1], str))
        last = parts[-1]
        if isinstance(node, list):
            if not isinstance(last, int) or last >= len(node):
                raise RecipeError(
                    [_set_problem(key, f"there is no item {last} (the list has {len(node)})")]
                )
            node[last] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(
                [_set_problem(key, f"{'.'.join(map(str, parts[:-1]))} is not a mapping")]
            )
        applied.add(tuple(parts))
    return applied


def _descend(node: Any, part: str | int, key: str, create: bool) -> Any:
    if isinstance(node, list):
        if not isinstance(part, int) or part >= len(node):
            raise RecipeError(
                [_set_problem(key, f"there is no item {part} (the list has {len(node)})")]
            )
        return node[part]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            if not create:
                raise RecipeError([_set_problem(key, f"there is no list at {part}")])
            node[part] = {}
        return node[part]
    raise RecipeError([_set_problem(key, f"cannot set a key inside {type(node).__name__}")])


def validate_recipe(
    data: dict[str, Any], where: Locator, default_name: str, needs_checkpoints: bool = True
) -> LoadedRecipe:
    """Validate the top level, then each step against its registered method."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(validation_problems(exc, Recipe, (), data, where)) from None
    if needs_checkpoints and not recipe.checkpoints:
        missing = "checkpoints" not in data
        message = "required key is missing" if missing else "list should have at least 1 item"
        raise RecipeError([where(("checkpoints",), message)])
    if recipe.name is None:
        recipe.name = default_name
    problems: list[str] = []
    warnings: list[str] = []
    steps: list[StepSpec] = []
    for index, raw in enumerate(recipe.steps):
        step = _validate_step(index, raw, data, where, problems, warnings)
        if step is not None:
            steps.append(step)
    if not recipe.steps:
        # A recipe without steps would run, write no model and exit 0: surely a mistake.
        problems.append(where(("steps",), "no steps; add at least one, e.g. `- merge: average`"))
    problems += _unmet_needs(recipe, steps, where)
    for step in steps:
        at = ("steps", step.index, step.kind)
        problems += [where((*at, *key), message)
                     for key, message in step.params.recipe_problems(recipe)]  # fmt: skip
    problems += _per_model_problems(recipe, data, where)
    problems += _varying_weight_problems(recipe, steps, where)
    if problems:
        raise RecipeError(problems)
    return LoadedRecipe(recipe, steps, where.filename, warnings, where)


def _validate_step(
    index: int,
    raw: Any,
    data: dict[str, Any],
    where: Locator,
    problems: list[str],
    warnings: list[str],
) -> StepSpec | None:
    # The registry is imported where it is used: its parameter models import recipe.schema,
    # and with it this package, so a module-level import would close a circle.
    from mergecli.registry import STEP_KINDS, default_method, methods_of, user_method

    at: Path_ = ("steps", index)
    if not isinstance(raw, dict) or len(raw) != 1:
        problems.append(where(at, f"a step is one key, one of {', '.join(STEP_KINDS)}"))
        return None
    kind, body = next(iter(raw.items()))
    if kind not in STEP_KINDS:
        problems.append(where((*at, kind), unknown_name("step kind", kind, STEP_KINDS)))
        return None
    body = {} if body is None else body
    if not isinstance(body, dict):
        problems.append(where((*at, kind), "must be a mapping of parameters, e.g. {method: ...}"))
        return None
    key = "method"
    if kind == "analyze" and "kind" in body:
        # `kind:` is the old name of an analysis's `method:`, still read, with a warning.
        if "method" in body:
            problems.append(
                where((*at, kind, "kind"), "give `method:` alone (`kind:` is its old name)")
            )
            return None
        key = "kind"
        warnings.append(where((*at, kind, "kind"), "deprecated; write `method:` instead"))
    method = body.get(key, default_method(kind))
    if isinstance(method, str) and is_reference(method):
        # The user's own method: importing its module registers it (a recipe is code).
        try:
            user_method(kind, method, key)
        except MergeCliError as exc:
            problems.append(where((*at, kind, key), str(exc)))
            return None
    available = methods_of(kind)
    if method is None:
        names = ", ".join(available) or "none yet"
        problems.append(where((*at, kind), f"needs `method:` (available: {names})"))
        return None
    if method not in available:
        problems.append(where((*at, kind, key), unknown_name(f"{kind} method", method, available)))
        return None
    params_cls = available[method].params
    params = {k: v for k, v in body.items() if k != key}
    try:
        validated = params_cls.model_validate(params)
    except ValidationError as exc:
        problems += validation_problems(exc, params_cls, (*at, kind), data, where)
        return None
    return StepSpec(index, kind, method, validated)


def _per_model_problems(recipe: Recipe, data: dict[str, Any], where: Locator) -> list[str]:
    """`checkpoints[].parameters` must be per-model parameters of the recipe's merge steps
    (those naming a known method, valid or not: their own problems are reported apart)."""
    from mergecli.registry import default_method, methods_of

    problems = []
    available = methods_of("merge")
    named = [
        step["merge"].get("method", default_method("merge"))
        for step in recipe.steps
        if isinstance(step, dict) and isinstance(step.get("merge"), dict)
    ]
    merges = [available[name] for name in named if isinstance(name, str) and name in available]
    for index, checkpoint in enumerate(recipe.checkpoints):
        for key, value in (checkpoint.parameters or {}).items():
            at = ("checkpoints", index, "parameters", key)
            takers = [m for m in merges if key in m.per_model]
            if not takers:
                offered = sorted({p for m in merges for p in m.per_model})
                names = ", ".join(m.name for m in merges) or "no merge step"
                problems.append(where(at, f"not a per-model parameter of {names} (these are: "
                                          f"{', '.join(offered) or 'none'})"))  # fmt: skip
                continue
            for method in takers:
                try:
                    method.params.model_validate({key: value})
                except ValidationError as exc:
                    problems += validation_problems(exc, method.params, at[:-1], data, where)
                    break
    return problems


def _varying_weight_problems(recipe: Recipe, steps: list[StepSpec], where: Locator) -> list[str]:
    """A weight that varies by tensor is for the data-free merge methods; the steps that weigh
    a whole model (fit, REPAIR, Fisher, RegMean, passthrough) need one number per model."""
    from mergecli.merge.step import MergeOptions

    varying = [i for i, c in enumerate(recipe.checkpoints) if c.varies]
    if not varying:
        return []
    readers = [
        f"{step.kind} {step.method}"
        for step in steps
        if step.kind == "fit"
        or (step.kind == "repair" and step.method == "repair")
        or (step.kind == "merge" and not isinstance(step.params, MergeOptions))
    ]
    if not readers:
        return []
    return [
        where(("checkpoints", i, "weight"), f"varies by tensor, which only the data-free merge "
              f"methods take; {readers[0]} weighs each model with one number: give one")
        for i in varying
    ]  # fmt: skip


def _unmet_needs(recipe: Recipe, steps: list[StepSpec], where: Locator) -> list[str]:
    from mergecli.registry import methods_of

    problems = []
    for step in steps:
        method = methods_of(step.kind)[step.method]
        reuses_saved = getattr(step.params, "from_", None) is not None
        for need in sorted(method.needs):
            if need.startswith("data.") and reuses_saved:
                continue  # re-applying saved transforms or coefficients needs no data
            if need in ("data.fit", "data.eval") and getattr(recipe.data, need[5:]) is None:
                problems.append(
                    where(
                        ("steps", step.index, step.kind),
                        f"{step.method} needs {need}; add `data: {{{need[5:]}: {{source: ...}}}}`",
                    )
                )
            if need == "data" and recipe.data.fit is None and recipe.data.eval is None:
                problems.append(
                    where(
                        ("steps", step.index, step.kind),
                        f"{step.method} needs data; add `data: {{eval: {{source: ...}}}}`",
                    )
                )
            if need == "base" and not any(c.role == "base" for c in recipe.checkpoints):
                problems.append(
                    where(
                        ("steps", step.index, step.kind),
                        f"{step.method} needs a base model; mark one checkpoint `role: base`",
                    )
                )
    return problems


def _set_problem(key: str, message: str) -> Problem:
    """A problem with a ``--set`` override: it has no line in the file, only its key."""
    return Problem(message, key=key, text=f"--set {key}: {message}")
