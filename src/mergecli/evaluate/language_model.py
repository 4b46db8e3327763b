"""The `evaluate` step for language models: per eval set, the mean next-token cross-entropy and
the perplexity of the merged model and of baselines (the endpoints, their output ensemble and
data-free merges)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from pydantic import Field, ValidationError
from torch import nn

from mergecli.data import TensorData
from mergecli.errors import MergeCliError
from mergecli.models import load_into_model
from mergecli.models.forward import TokenBatch, model_logits
from mergecli.recipe.schema import Recipe, StepParams, shown_default
from mergecli.registry import StepMethod, methods_of, step_method, user_method
from mergecli.runtime.distributed import current as current_world
from mergecli.runtime.log import Column, fixed
from mergecli.state import Checkpoint, MergeState, StateDict

# A baseline: "endpoints", "ensemble", "aligned_average", a merge method's name, or
# {name: {its parameters}}.
Baseline = str | dict[str, dict[str, Any]]
# Baselines that are not merge methods.
OWN_BASELINES = ("endpoints", "ensemble", "aligned_average")
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
                if name in OWN_BASELINES:
                    if options:
                        problems.append((("baselines", i), f"{name} takes no parameters"))
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
                if "data.fit" in method.needs and recipe.data.fit is None:
                    problems.append(
                        (("baselines", i), f"{name} needs data.fit; add `data: {{fit: "
                         "{source: ...}}` or leave this baseline out")
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
            f"unknown baseline '{name}'; use {', '.join(OWN_BASELINES)} or a merge method: "
            f"{', '.join(methods)}"
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
    names = [_named(b)[0] for b in params.resolved(state.loaded.recipe)]
    if "aligned_average" in names and not any(c.aligned is not None for c in state.models):
        raise MergeCliError(
            "evaluate: baseline aligned_average needs an `align` step before `evaluate`"
        )
    # Each endpoint's per-token log-probabilities, read once for its row and the ensemble's.
    endpoint_log_probs: dict[int, dict[str, TokenLogProbs]] = {}

    def log_probs_of(weights: StateDict, where: str) -> dict[str, TokenLogProbs]:
        load_into_model(module, weights, where)
        return {
            set_name: target_log_probs(module, data, state.eval_batch_size(set_name), state.device)
            for set_name, data in sets.items()
        }

    def endpoint(checkpoint: Checkpoint) -> dict[str, TokenLogProbs]:
        if checkpoint.index not in endpoint_log_probs:
            where = f"evaluate: {checkpoint.name}"
            endpoint_log_probs[checkpoint.index] = log_probs_of(checkpoint.tensors, where)
        return endpoint_log_probs[checkpoint.index]

    rows: list[dict[str, Any]] = []
    for name, kind, source in _candidates(state, params):
        if source is None:  # the output ensemble of the endpoints
            members = [endpoint(c) for c in state.models]
            results = {
                s: token_metrics_of(
                    ensemble_log_probs([m[s][0] for m in members]), members[0][s][1]
                )
                for s in sets
            }
        else:
            per_set = (
                endpoint(source)
                if isinstance(source, Checkpoint)
                else log_probs_of(source(), f"evaluate: {name}")
            )
            results = {s: token_metrics_of(*per_set[s]) for s in sets}
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


# A model to evaluate: its name, kind and where its weights come from: a checkpoint, a function
# that makes them when it is evaluated (so that one merge at a time is in memory), or None for
# the endpoints' ensemble.
Candidate = tuple[str, str, Checkpoint | Callable[[], StateDict] | None]


def _candidates(state: MergeState, params: LanguageModelParams) -> Iterator[Candidate]:
    """The baselines in the recipe's order, then the merged model."""
    for baseline in params.resolved(state.loaded.recipe):
        name, options = _named(baseline)
        if name == "endpoints":
            for checkpoint in state.checkpoints:
                role = "base" if checkpoint.spec.role == "base" else "endpoint"
                yield checkpoint.name, role, checkpoint
        elif name == "ensemble":
            yield "ensemble", "ensemble", None
        elif name == "aligned_average":
            yield "aligned average", name, lambda: merged_by(state, "average", {}, aligned=True)
        else:
            yield _label(name, options), name, lambda n=name, o=options: merged_by(state, n, o)
    if state.merged is not None:
        merged = state.merged
        yield f"merged ({' + '.join(state.history)})", "merged", lambda: merged


def merged_by(
    state: MergeState, name: str, options: dict[str, Any], aligned: bool = False
) -> StateDict:
    """The merge that ``merge: {method: name, **options}`` would make of the recipe's
    checkpoints, through the merge engine, leaving ``state`` as it is: of the checkpoints as
    loaded (the naive merge, as the classification evaluation's `average`), or with ``aligned``
    of their tensors after `align`."""
    method = _merge_method(name, "evaluate.baselines")
    scratch = copy.copy(state)  # the method sets `merged` on it, not on the run's state
    scratch.merged = None
    scratch.report = {}  # what the method reports is the baseline's, not the run's
    if not aligned:
        scratch.checkpoints = [dataclasses.replace(c, aligned=None) for c in state.checkpoints]
    method.run(scratch, method.params.model_validate(options))
    if not isinstance(scratch.merged, dict):
        raise MergeCliError(f"evaluate: merge method {name} made no state dict")
    return scratch.merged


# Per predicted token of this rank's share of an eval set: the log-probability the model gives
# the next token, and its weight (1 a token, 0 padding); both flat, float64.
TokenLogProbs = tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def target_log_probs(
    module: nn.Module, data: TensorData, batch_size: int, device: torch.device
) -> TokenLogProbs:
    """log p(``ids[:, t + 1]`` | ``ids[:, :t + 1]``) for every predicted token of this rank's
    share of ``data`` (padded targets weigh 0, as in `next_token_losses`), on the CPU."""
    module.eval()
    world = current_world()
    start, end = world.part(len(data))
    log_probs, weights = [], []
    for x, _ in data.take(slice(start, end)).batches(batch_size, device=device):
        ids, mask = (x.ids, x.mask) if isinstance(x, TokenBatch) else (x, None)
        logits = model_logits(module, x)[:, :-1].float()
        targets = ids[:, 1:].unsqueeze(-1)
        chosen = logits.log_softmax(-1).gather(-1, targets)
        log_probs.append(chosen.reshape(-1).to("cpu", torch.float64))
        keep = torch.ones_like(targets, dtype=torch.float64) if mask is None else mask[:, 1:]
        weights.append(keep.reshape(-1).to("cpu", torch.float64))
    empty = torch.zeros(0, dtype=torch.float64)
    return torch.cat(log_probs) if log_probs else empty, torch.cat(weights) if weights else empty


def ensemble_log_probs(members: list[torch.Tensor]) -> torch.Tensor:
    """The output ensemble's log-probability of each target: log of the mean of the members'
    probabilities (as `evaluate.metrics.ensemble_logits` makes a classifier ensemble's)."""
    return torch.logsumexp(torch.stack(members), dim=0) - math.log(len(members))


def token_metrics_of(log_probs: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    """Mean next-token cross-entropy (−log-probability) over the weighted tokens of every rank,
    and its perplexity (exp of that mean)."""
    # A padded target's log-probability may be -inf; it weighs nothing.
    kept = torch.where(weights > 0, log_probs * weights, 0.0)
    sums = torch.stack([-kept.sum(), weights.sum()])
    loss, count = current_world().all_reduce_(sums).tolist()
    if count == 0:
        raise MergeCliError("evaluate: the eval set has no token to predict (sequences of 1)")
    mean = loss / count
    return {"loss": mean, "perplexity": math.exp(mean) if mean < 700 else math.inf}


def token_metrics(
    module: nn.Module, data: TensorData, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Mean next-token cross-entropy over every predicted token of ``data`` and its
    perplexity (exp of that mean). Ranks each run their share; the sums are all-reduced."""
    return token_metrics_of(*target_log_probs(module, data, batch_size, device))


def predicted_tokens(data: TensorData) -> int:
    """How many tokens the evaluation predicts in ``data``: all but each sequence's first."""
    if data.mask is None:
        return len(data) * (int(data.x.shape[1]) - 1)
    return int(data.mask[:, 1:].sum())
