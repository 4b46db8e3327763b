"""The `evaluate` step: the merged model against its baselines, as one table and report entry."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mergecli.errors import MergeCliError
from mergecli.evaluate.metrics import (
    accuracy,
    classification_metrics,
    collect_logits,
    ensemble_logits,
    logit_ensemble,
)
from mergecli.recipe.schema import StepParams
from mergecli.registry import step_method
from mergecli.runtime.log import Column, fixed, percent, points
from mergecli.state import MergeState

Baseline = Literal["endpoints", "ensemble", "logit_ensemble", "average", "aligned_average"]


class EvaluateParams(StepParams):
    baselines: list[Baseline] = Field(default_factory=lambda: ["endpoints", "ensemble", "average"])
    split: Literal["eval", "fit"] = "eval"


@step_method(
    "evaluate", "classification", EvaluateParams, needs=("model", "data.eval"), default=True
)
def evaluate_classification(state: MergeState, params: EvaluateParams) -> None:
    """Accuracy, cross-entropy, calibration and per-class accuracy: merged model and baselines.

    Rows follow the order of ``baselines`` in the recipe, the merged model last.
    """
    from mergecli.merge.average import average
    from mergecli.merge.step import merge_state_dicts

    data = state.data(params.split)
    batch_size = state.batch_size(params.split)
    module = state.build_module()
    labels = data.y

    def logits_of(state_dict):
        return collect_logits(module, state_dict, data, batch_size, state.device)

    rows: list[dict] = []

    def add(name: str, kind: str, logits) -> None:
        rows.append({"name": name, "kind": kind, **classification_metrics(logits, labels)})

    endpoint_logits = {c.name: logits_of(c.tensors) for c in state.models}
    for baseline in dict.fromkeys(params.baselines):
        if baseline == "endpoints":
            for checkpoint in state.checkpoints:
                logits = endpoint_logits.get(checkpoint.name)
                if logits is None:
                    logits = logits_of(checkpoint.tensors)
                role = "base" if checkpoint.spec.role == "base" else "endpoint"
                add(checkpoint.name, role, logits)
        elif baseline == "ensemble":
            add("ensemble", "ensemble", ensemble_logits(list(endpoint_logits.values())))
        elif baseline == "logit_ensemble":
            add("logit ensemble", "logit_ensemble", logit_ensemble(list(endpoint_logits.values())))
        elif baseline == "average":
            averaged = merge_state_dicts(state, average, {"normalize": True}, False, aligned=False)
            add("average", "average", logits_of(averaged))
        elif baseline == "aligned_average":
            if not any(c.aligned is not None for c in state.models):
                raise MergeCliError(
                    "evaluate: baseline aligned_average needs an `align` step before `evaluate`"
                )
            averaged = merge_state_dicts(state, average, {"normalize": True}, False, aligned=True)
            add("aligned average", "aligned_average", logits_of(averaged))
    if state.merged is not None:
        add(f"merged ({' + '.join(state.history)})", "merged", logits_of(state.merged))
        if "fit" in state.report:
            rows[-1]["fit_seconds"] = state.report["fit"]["seconds"]

    best = max((accuracy(z, labels) for z in endpoint_logits.values()), default=None)
    ensemble = next((r["accuracy"] for r in rows if r["kind"] == "ensemble"), None)
    for row in rows:
        row["delta_vs_best_endpoint"] = None if best is None else row["accuracy"] - best
        row["delta_vs_ensemble"] = None if ensemble is None else row["accuracy"] - ensemble
    state.report["evaluate"] = {"split": params.split, "examples": len(data), "results": rows}
    state.log.table(
        f"evaluation on data.{params.split} ({len(data)} examples)",
        EVALUATION_COLUMNS,
        [
            [r["name"], r["kind"], r["accuracy"], r["loss"], r["ece"],
             r["delta_vs_best_endpoint"], r["delta_vs_ensemble"], r.get("fit_seconds")]
            for r in rows
        ],
    )  # fmt: skip


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
