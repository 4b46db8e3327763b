"""The `evaluate` step for language models: per eval set, the mean next-token cross-entropy and
the perplexity of the merged model and of baselines (the endpoints and data-free merges)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from pydantic import Field, ValidationError
from torch import nn

from mergecli.data import TensorData
from mergecli.errors import MergeCliError
from mergecli.evaluate.tokens import next_token_losses
from mergecli.models import load_into_model
from mergecli.models.forward import TokenBatch, model_logits
from mergecli.recipe.schema import Recipe, StepParams, shown_default
from mergecli.registry import StepMethod, methods_of, step_method, user_method
from mergecli.runtime.distributed import current as current_world
from mergecli.runtime.log import Column, fixed
from mergecli.state import MergeState, StateDict

# A baseline: "endpoints", a merge method's name, or {name: {its parameters}}.
Baseline = str | dict[str, dict[str, Any]]
DEFAULT_TEXT = "endpoints, average; with a base checkpoint also task_arithmetic, ties"


class LanguageModelParams(StepParams):
    baselines: list[Baseline] | None = Field(
        default=None, json_schema_extra=shown_default(DEFAULT_TEXT)
    )

    def recipe_problems(self, recipe: Recipe) -> list[tuple[tuple[str | int, ...], str]]:
        has_base = any(c.role == "base" for c in recipe.checkpoints)
        problems = []
        for i, baseline in enumerate(self.resolved(recipe)):
            try:
                name, options = _named(baseline)
                if name == "endpoints":
                    continue
                method = _merge_method(name, f"baselines.{i}")
                method.params.model_validate(options)
            except MergeCliError as exc:
                problems.append((("baselines", i), str(exc)))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"] if p in options)  # no union tags
                problems.append(
                    (("baselines", i), f"{name}: {where + ': ' if where else ''}{first['msg']}")
                )
            else:
                if "base" in method.needs and not has_base:
                    problems.append(
                        (("baselines", i), f"{name} needs a base model; mark one checkpoint "
                         "`role: base` or leave this baseline out")
                    )  # fmt: skip
        return problems

    def defaults_used(self, recipe: Recipe) -> dict[str, Any]:
        return {"baselines": self.resolved(recipe)} if self.baselines is None else {}

    def resolved(self, recipe: Recipe) -> list[Baseline]:
        """The baselines, the default's chosen by whether the recipe has a base model."""
        if self.baselines is not None:
            return self.baselines
        with_base = any(c.role == "base" for c in recipe.checkpoints)
        return ["endpoints", "average"] + (["task_arithmetic", "ties"] if with_base else [])


def _named(baseline: Baseline) -> tuple[str, dict[str, Any]]:
    """A baseline's method name and parameters."""
    if isinstance(baseline, str):
        return baseline, {}
    if len(baseline) != 1:
        raise MergeCliError(
            f"a baseline with parameters is one method and its parameters, e.g. "
            f"{{ties: {{density: 0.2}}}}, got {len(baseline)} keys"
        )
    [(name, options)] = baseline.items()
    return name, options or {}


def _merge_method(name: str, key: str) -> StepMethod:
    """The merge method a baseline names: a built-in or a user's `package.module:function`."""
    if ":" in name:
        return user_method("merge", name, key)
    methods = methods_of("merge")
    if name not in methods:
        raise MergeCliError(
            f"unknown baseline '{name}'; use endpoints or a merge method: {', '.join(methods)}"
        )
    return methods[name]


def _label(name: str, options: dict[str, Any]) -> str:
    """How a baseline reads in the table: its name, and its parameters when the recipe set any."""
    if not options:
        return name
    return f"{name} ({', '.join(f'{k}={v}' for k, v in options.items())})"


@step_method("evaluate", "language_model", LanguageModelParams, needs=("model", "data.eval"))
def evaluate_language_model(state: MergeState, params: LanguageModelParams) -> None:
    """Token cross-entropy and perplexity per eval set: the merged model and baselines."""
    sets = state.eval_sets()
    module = state.build_module()
    rows: list[dict[str, Any]] = []
    for name, kind, weights in _candidates(state, params):
        load_into_model(module, weights(), f"evaluate: {name}")
        results = {
            set_name: token_metrics(module, data, state.eval_batch_size(set_name), state.device)
            for set_name, data in sets.items()
        }
        row = {"name": name, "kind": kind, "sets": results}
        row["mean_perplexity"] = sum(r["perplexity"] for r in results.values()) / len(results)
        if kind == "merged" and "fit" in state.report:
            row["fit_seconds"] = state.report["fit"]["seconds"]
        rows.append(row)
    tokens = {n: predicted_tokens(d) for n, d in sets.items()}
    state.report["evaluate"] = {
        "method": "language_model",
        "sets": {n: {"sequences": len(d), "tokens": tokens[n]} for n, d in sets.items()},
        "results": rows,
    }
    columns = [Column("model", name=True), Column("kind", name=True)]
    for set_name in sets:
        columns += [
            Column(f"{set_name} CE", f"{set_name}_loss", fixed(4)),
            Column(f"{set_name} ppl", f"{set_name}_perplexity", fixed(2)),
        ]
    columns += [
        Column("mean ppl", "mean_perplexity", fixed(2)),
        Column("fit time", "fit_seconds", lambda s: f"{s:.1f} s"),
    ]
    cells = [
        [r["name"], r["kind"]]
        + [v for n in sets for v in (r["sets"][n]["loss"], r["sets"][n]["perplexity"])]
        + [r["mean_perplexity"], r.get("fit_seconds")]
        for r in rows
    ]
    counts = ", ".join(f"{n}: {t} tokens" for n, t in tokens.items())
    state.log.table(f"language model evaluation on data.eval ({counts})", columns, cells)


# A model to evaluate: its name, kind and how to make its weights (made when it is evaluated,
# so that one merge at a time is in memory).
Candidate = tuple[str, str, Callable[[], StateDict]]


def _candidates(state: MergeState, params: LanguageModelParams) -> Iterator[Candidate]:
    """The baselines in the recipe's order, then the merged model."""
    for baseline in params.resolved(state.loaded.recipe):
        name, options = _named(baseline)
        if name == "endpoints":
            for checkpoint in state.checkpoints:
                role = "base" if checkpoint.spec.role == "base" else "endpoint"
                yield checkpoint.name, role, lambda c=checkpoint: c.tensors
        else:
            yield _label(name, options), name, lambda n=name, o=options: merged_by(state, n, o)
    if state.merged is not None:
        merged = state.merged
        yield f"merged ({' + '.join(state.history)})", "merged", lambda: merged


def merged_by(state: MergeState, name: str, options: dict[str, Any]) -> StateDict:
    """The merge that ``merge: {method: name, **options}`` would make of the recipe's
    checkpoints, through the merge engine, leaving ``state`` as it is."""
    method = _merge_method(name, "evaluate.baselines")
    scratch = copy.copy(state)  # the method sets `merged` on it, not on the run's state
    scratch.merged = None
    method.run(scratch, method.params.model_validate(options))
    if not isinstance(scratch.merged, dict):
        raise MergeCliError(f"evaluate: merge method {name} made no state dict")
    return scratch.merged


@torch.no_grad()
def token_metrics(
    module: nn.Module, data: TensorData, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Mean next-token cross-entropy over every predicted token of ``data`` and its
    perplexity (exp of that mean). Ranks each run their share; the sums are all-reduced."""
    module.eval()
    world = current_world()
    start, end = world.part(len(data))
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, tokens
    for x, _ in data.take(slice(start, end)).batches(batch_size, device=device):
        ids, mask = (x.ids, x.mask) if isinstance(x, TokenBatch) else (x, None)
        total, count = next_token_losses(model_logits(module, x), ids, mask)
        sums[0] += total
        sums[1] += count
    loss, count = world.all_reduce_(sums).tolist()
    if count == 0:
        raise MergeCliError("evaluate: the eval set has no token to predict (sequences of 1)")
    mean = loss / count
    return {"loss": mean, "perplexity": math.exp(mean) if mean < 700 else math.inf}


def predicted_tokens(data: TensorData) -> int:
    """How many tokens the evaluation predicts in ``data``: all but each sequence's first."""
    if data.mask is None:
        return len(data) * (int(data.x.shape[1]) - 1)
    return int(data.mask[:, 1:].sum())
