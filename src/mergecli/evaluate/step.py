"""The `evaluate` step: the merged model against its baselines, as one table and report entry."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mergecli.errors import MergeCliError
from mergecli.evaluate.metrics import accuracy, collect_logits, cross_entropy, ensemble_logits
from mergecli.registry import StepParams, step_method
from mergecli.state import MergeState

Baseline = Literal["endpoints", "ensemble", "average", "aligned_average"]


class EvaluateParams(StepParams):
    baselines: list[Baseline] = Field(default_factory=lambda: ["endpoints", "ensemble", "average"])
    split: Literal["eval", "fit"] = "eval"


@step_method(
    "evaluate", "classification", EvaluateParams, needs=("model", "data.eval"), default=True
)
def evaluate_classification(state: MergeState, params: EvaluateParams) -> None:
    """Accuracy and cross-entropy of the merged model and of the chosen baselines."""
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
        rows.append(
            {
                "name": name,
                "kind": kind,
                "accuracy": accuracy(logits, labels),
                "loss": cross_entropy(logits, labels),
            }
        )

    endpoint_logits = {c.name: logits_of(c.tensors) for c in state.models}
    if "endpoints" in params.baselines:
        for checkpoint in state.checkpoints:
            logits = endpoint_logits.get(checkpoint.name)
            if logits is None:
                logits = logits_of(checkpoint.tensors)
            add(checkpoint.name, "base" if checkpoint.spec.role == "base" else "endpoint", logits)
    if "ensemble" in params.baselines:
        add("ensemble", "ensemble", ensemble_logits(list(endpoint_logits.values())))
    if "average" in params.baselines:
        averaged = merge_state_dicts(state, average, {"normalize": True}, False, aligned=False)
        add("average", "average", logits_of(averaged))
    if "aligned_average" in params.baselines:
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

    best = max((r["accuracy"] for r in rows if r["kind"] == "endpoint"), default=None)
    for row in rows:
        row["delta_vs_best_endpoint"] = None if best is None else row["accuracy"] - best
    state.report["evaluate"] = {"split": params.split, "examples": len(data), "results": rows}
    state.log.table(
        f"evaluation on data.{params.split} ({len(data)} examples)",
        ["model", "kind", "accuracy", "loss", "Δ acc vs best (pts)", "fit time"],
        [
            [
                r["name"],
                r["kind"],
                f"{100 * r['accuracy']:.2f}%",
                f"{r['loss']:.4f}",
                ""
                if r["delta_vs_best_endpoint"] is None
                else f"{100 * r['delta_vs_best_endpoint']:+.2f}",
                f"{r['fit_seconds']:.1f} s" if "fit_seconds" in r else "",
            ]
            for r in rows
        ],
    )
