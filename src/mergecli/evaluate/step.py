"""The `evaluate` step: the merged model against its baselines, as one table and report entry."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from mergecli.data import TensorData
from mergecli.errors import MergeCliError
from mergecli.evaluate.baselines import Baseline, baseline_problems, merge_baseline_model
from mergecli.evaluate.metrics import (
    accuracy,
    classification_metrics,
    collect_logits,
    ensemble_logits,
    logit_ensemble,
)
from mergecli.recipe.schema import Recipe, StepParams
from mergecli.registry import step_method
from mergecli.runtime.log import Column, fixed, percent, points
from mergecli.state import MergeState, StateDict

# Baselines that are not merge methods (any merge method is one too: mergecli.evaluate.baselines).
OWN_BASELINES = (
    "endpoints",
    "ensemble",
    "logit_ensemble",
    "average",
    "aligned_average",
    "aligned_ensemble",
)


class EvaluateParams(StepParams):
    baselines: list[Baseline] = Field(default_factory=lambda: ["endpoints", "ensemble", "average"])
    split: Literal["eval", "fit"] = "eval"

    def recipe_problems(self, recipe: Recipe) -> list[tuple[tuple[str | int, ...], str]]:
        return baseline_problems(self.baselines, recipe, OWN_BASELINES)


@step_method(
    "evaluate", "classification", EvaluateParams, needs=("model", "data.eval"), default=True
)
def evaluate_classification(state: MergeState, params: EvaluateParams) -> None:
    """Accuracy, cross-entropy, calibration and per-class accuracy: merged model and baselines.

    Rows follow the order of ``baselines`` in the recipe, the merged model last; with several
    named eval sets, those rows once per set (a `set` column says which).
    """
    if params.split == "fit":
        sets = {"fit": (state.data("fit"), state.batch_size("fit"))}
    else:
        sets = {n: (d, state.eval_batch_size(n)) for n, d in state.eval_sets().items()}
    module = state.build_module()
    candidates = _candidates(state, params)
    several = len(sets) > 1
    rows: list[dict] = []
    for name, (data, batch_size) in sets.items():
        for row in _rows(state, module, candidates, data, batch_size):
            rows.append({"set": name, **row} if several else row)
    columns = EVALUATION_COLUMNS
    cells = [
        [r["name"], r["kind"], r["accuracy"], r["loss"], r["ece"],
         r["delta_vs_best_endpoint"], r["delta_vs_ensemble"], r.get("fit_seconds")]
        for r in rows
    ]  # fmt: skip
    if several:
        columns = [Column("set", name=True), *columns]
        cells = [[r["set"], *row] for r, row in zip(rows, cells, strict=True)]
        counts = {n: len(d) for n, (d, _) in sets.items()}
        listed = ", ".join(f"{n}: {c} examples" for n, c in counts.items())
        title = f"evaluation on data.eval ({listed})"
        state.report["evaluate"] = {
            "split": "eval", "examples": sum(counts.values()), "sets": counts, "results": rows,
        }  # fmt: skip
    else:
        examples = len(next(iter(sets.values()))[0])
        title = f"evaluation on data.{params.split} ({examples} examples)"
        state.report["evaluate"] = {"split": params.split, "examples": examples, "results": rows}
    state.log.table(title, columns, cells)


# A model to evaluate: its name, kind and weights (None: an ensemble, of the endpoints or of
# the aligned models).
Candidate = tuple[str, str, StateDict | None]


def _candidates(state: MergeState, params: EvaluateParams) -> list[Candidate]:
    """The baselines in the recipe's order, then the merged model; merges are made once here
    for every eval set."""
    from mergecli.merge.average import average
    from mergecli.merge.step import merge_state_dicts

    candidates: list[Candidate] = []
    seen: set[str] = set()
    for baseline in params.baselines:
        if isinstance(baseline, str):
            if baseline in seen:
                continue
            seen.add(baseline)
        if not isinstance(baseline, str) or baseline not in OWN_BASELINES:
            candidates.append(merge_baseline_model(state, baseline, "evaluate"))
        elif baseline == "endpoints":
            for checkpoint in state.checkpoints:
                role = "base" if checkpoint.spec.role == "base" else "endpoint"
                candidates.append((checkpoint.name, role, checkpoint.tensors))
        elif baseline == "ensemble":
            candidates.append(("ensemble", "ensemble", None))
        elif baseline == "logit_ensemble":
            candidates.append(("logit ensemble", "logit_ensemble", None))
        elif baseline == "average":
            averaged = merge_state_dicts(state, average, {"normalize": True}, False, aligned=False)
            candidates.append(("average", "average", averaged))
        elif baseline == "aligned_average":
            if not any(c.aligned is not None for c in state.models):
                raise MergeCliError(
                    "evaluate: baseline aligned_average needs an `align` step before `evaluate`"
                )
            averaged = merge_state_dicts(state, average, {"normalize": True}, False, aligned=True)
            candidates.append(("aligned average", "aligned_average", averaged))
        elif baseline == "aligned_ensemble":
            if not any(c.aligned is not None for c in state.models):
                raise MergeCliError(
                    "evaluate: baseline aligned_ensemble needs an `align` step before `evaluate`"
                )
            candidates.append(("aligned ensemble", "aligned_ensemble", None))
    if state.merged is not None:
        candidates.append((f"merged ({' + '.join(state.history)})", "merged", state.merged))
    return candidates


def _rows(
    state: MergeState,
    module: nn.Module,
    candidates: list[Candidate],
    data: TensorData,
    batch_size: int,
) -> list[dict]:
    """Every candidate's metrics on ``data``, with its differences to the best endpoint and to
    the ensemble on the same data."""
    labels = data.y

    def logits_of(state_dict: StateDict) -> Tensor:
        return collect_logits(module, state_dict, data, batch_size, state.device)

    endpoint_logits = {c.name: logits_of(c.tensors) for c in state.models}
    rows: list[dict] = []
    for name, kind, weights in candidates:
        if kind == "ensemble":
            logits = ensemble_logits(list(endpoint_logits.values()))
        elif kind == "logit_ensemble":
            logits = logit_ensemble(list(endpoint_logits.values()))
        elif kind == "aligned_ensemble":  # after a partial zip: ZipIt!'s multi-head model
            logits = ensemble_logits([logits_of(c.aligned_or_original) for c in state.models])
        elif kind == "endpoint" and name in endpoint_logits:
            logits = endpoint_logits[name]
        else:
            logits = logits_of(weights)
        rows.append({"name": name, "kind": kind, **classification_metrics(logits, labels)})
    if rows and rows[-1]["kind"] == "merged" and "fit" in state.report:
        rows[-1]["fit_seconds"] = state.report["fit"]["seconds"]

    best = max((accuracy(z, labels) for z in endpoint_logits.values()), default=None)
    ensemble = next((r["accuracy"] for r in rows if r["kind"] == "ensemble"), None)
    for row in rows:
        row["delta_vs_best_endpoint"] = None if best is None else row["accuracy"] - best
        row["delta_vs_ensemble"] = None if ensemble is None else row["accuracy"] - ensemble
    return rows


# Accuracies are fractions in the JSON log (as in report.json) and percent for people.
EVALUATION_COLUMNS = [
    Column("model", name=True),
    Column("kind", name=True),
    Column("accuracy", "accuracy_fraction", percent),
    Column("loss", show=fixed(4)),
    Column("ECE", "ece", fixed(3)),
    Column("Δ vs best (pts)", "delta_vs_best_fraction", points),
    Column("Δ vs ensemble", "delta_vs_ensemble_fraction", points),
    Column("fit time", "fit_seconds", lambda s: f"{s:.1f} s"),
]
