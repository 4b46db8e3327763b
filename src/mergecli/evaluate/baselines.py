"""Merge methods as baselines: how a step names them, checks them before anything runs, and makes
them. Shared by `evaluate: classification` and `analyze: averaging_vs_ensembling`."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from mergecli.errors import MergeCliError
from mergecli.recipe.schema import Recipe
from mergecli.registry import methods_of
from mergecli.state import MergeState, StateDict

# A baseline: a step's own (a word it knows, e.g. `ensemble`), a merge method's name (`aligned_`
# before it: of the aligned checkpoints), or {name: {its parameters}}.
Baseline = str | dict[str, dict[str, Any]]
ALIGNED = "aligned_"
# ZipIt! is an align method whose merge is the zipped models' average: as a baseline it zips the
# checkpoints as loaded (with the align method's parameters) and averages them.
ZIPIT = "zipit"
Problems = list[tuple[tuple[str | int, ...], str]]


def merge_baseline(baseline: Baseline, own: tuple[str, ...] = ()) -> tuple[str, dict[str, Any]]:
    """A merge-method baseline's method name and parameters, the method's name without the
    `aligned_` that asks for the aligned checkpoints; ``own`` are the step's other baselines."""
    from mergecli.evaluate.language_model import _named

    name, options = _named(baseline)
    if name in own:
        raise MergeCliError(f"{name} takes no parameters; name it alone: `{name}`")
    return name.removeprefix(ALIGNED), options


def baseline_problems(
    baselines: list[Baseline], recipe: Recipe, own: tuple[str, ...] = ()
) -> Problems:
    """What is wrong with a step's `baselines` (an unknown method, a bad parameter, a method
    whose base model or data.fit the recipe lacks), one message per baseline, at validate."""
    from mergecli.evaluate.language_model import _merge_method

    problems: Problems = []
    for i, baseline in enumerate(baselines):
        if isinstance(baseline, str) and baseline in own:
            continue
        name, options = str(baseline), {}
        try:
            name, options = merge_baseline(baseline, own)
            if name == ZIPIT:
                problems += _zipit_problems(i, baseline, options, recipe)
                continue
            if ":" not in name and name not in methods_of("merge"):
                words = f"{', '.join(own)}, or a merge method" if own else "a merge method"
                raise MergeCliError(
                    f"unknown baseline '{name}'; use {words} ({ALIGNED}METHOD: of the aligned "
                    f"checkpoints): {', '.join(methods_of('merge'))}"
                )
            method = _merge_method(name, f"baselines.{i}")
            method.params.model_validate(options)
        except MergeCliError as exc:
            problems.append((("baselines", i), str(exc)))
            continue
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"] if p in options)
            problems.append(
                (("baselines", i), f"{name}: {where + ': ' if where else ''}{first['msg']}")
            )
            continue
        if "base" in method.needs and not any(c.role == "base" for c in recipe.checkpoints):
            problems.append((("baselines", i), f"{name} needs a base model; mark one "
                             "checkpoint `role: base` or leave this baseline out"))  # fmt: skip
        if "data.fit" in method.needs and recipe.data.fit is None:
            problems.append((("baselines", i), f"{name} needs data.fit; add `data: {{fit: "
                             "{source: ...}}` or leave this baseline out"))  # fmt: skip
    return problems


def _zipit_problems(
    i: int, baseline: Baseline, options: dict[str, Any], recipe: Recipe
) -> Problems:
    """A zipit baseline: ZipIt!'s parameters, of the checkpoints as loaded, with data.fit."""
    from mergecli.align.zipit_step import ZipItParams

    found: Problems = []
    label = baseline if isinstance(baseline, str) else next(iter(baseline))
    if label != ZIPIT:
        found.append((("baselines", i), f"{label}: zipit aligns the checkpoints itself; name "
                      "it `zipit` (of the checkpoints as loaded)"))  # fmt: skip
    extra = sorted(set(options) & {"from", "save_aligned"})
    if extra:
        found.append((("baselines", i), f"zipit: {extra[0]} is for the align step, not a "
                      "baseline; leave it out"))  # fmt: skip
    try:
        ZipItParams.model_validate(options)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        found.append((("baselines", i), f"zipit: {where + ': ' if where else ''}{first['msg']}"))
    if recipe.data.fit is None:
        found.append((("baselines", i), "zipit needs data.fit (its correlations); add `data: "
                      "{fit: {source: ...}}` or leave this baseline out"))  # fmt: skip
    return found[:1]  # one message per baseline, as for the merge methods


def merge_baseline_model(
    state: MergeState, baseline: Baseline, step: str
) -> tuple[str, str, StateDict]:
    """A merge-method baseline's label for tables, its name as the recipe gives it (the row's
    kind in `evaluate`) and its weights, made as a `merge` step with the method would make them
    of the checkpoints as loaded, or after `align` with `aligned_` before the name."""
    from mergecli.evaluate.language_model import _label, _named, merged_by

    name, options = _named(baseline)
    method, _ = merge_baseline(baseline)
    if name == ZIPIT:
        from mergecli.align.zipit_step import ZipItParams, zipit_merge

        return _label(name, options), name, zipit_merge(state, ZipItParams(**options))
    aligned = name.startswith(ALIGNED)
    if aligned and not any(c.aligned is not None for c in state.models):
        raise MergeCliError(f"{step}: baseline {name} needs an `align` step before `{step}`")
    return _label(name, options), name, merged_by(state, method, options, aligned=aligned)
