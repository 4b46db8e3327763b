"""The coefficients NP Merge learned: their distribution per layer and which model each favours.

A coefficient is the weight of the reference model in the merge of one parameter (pairwise:
θ = α θ_ref + (1-α) θ_other; joint: the reference's softmax weight). A layer whose mean is
above 1/N leans toward the reference.
"""

from __future__ import annotations

import json

import torch
from pydantic import Field

from mergecli.errors import MergeCliError
from mergecli.fit.step import COEFFICIENTS_FILE
from mergecli.recipe.schema import StepParams
from mergecli.registry import step_method
from mergecli.runtime.log import Column, fixed
from mergecli.state import MergeState


class CoefficientsParams(StepParams):
    bins: int = Field(default=20, ge=2, le=200)


@step_method("analyze", "coefficients", CoefficientsParams, needs=("model",))
def analyze_coefficients(state: MergeState, params: CoefficientsParams) -> None:
    """Histogram and mean of the learned coefficients, per tensor."""
    if COEFFICIENTS_FILE not in state.artifacts:
        raise MergeCliError(
            f"{state.loaded.source}: analyze coefficients needs a `fit` step before it (the "
            "coefficients it learns are what this analysis shows)"
        )
    tensors, metadata = state.artifacts[COEFFICIENTS_FILE]
    joint = metadata.get("mergecli.multi") == "joint"
    models = json.loads(metadata.get("mergecli.models", "[]"))
    edges = torch.linspace(0, 1, params.bins + 1)
    layers = []
    for name, values in tensors.items():
        weight = (values[0] if joint else values).float().reshape(-1)
        counts = torch.histc(weight, bins=params.bins, min=0.0, max=1.0)
        layers.append({"tensor": name, "count": weight.numel(), "mean": float(weight.mean()),
                       "std": float(weight.std()) if weight.numel() > 1 else 0.0,
                       "histogram": counts.long().tolist()})  # fmt: skip
    even = 1 / max(1, len(models)) if joint else 0.5
    state.report.setdefault("analysis", {})["coefficients"] = {
        "reference": models[0] if models else state.reference.name,
        "models": models,
        "multi": metadata.get("mergecli.multi"),
        "even": even,
        "bin_edges": edges.tolist(),
        "layers": layers,
    }
    state.log.table(
        f"learned coefficients (weight of {models[0] if models else 'the reference'})",
        ["tensor", "values", Column("mean", show=fixed(3)), Column("std", show=fixed(3))],
        [[r["tensor"], r["count"], r["mean"], r["std"]] for r in layers],
    )
