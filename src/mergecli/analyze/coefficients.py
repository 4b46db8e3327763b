"""The coefficients NP Merge learned: their distribution per layer and which model each favours.

A coefficient is the weight of the reference model in the merge of one parameter (pairwise:
θ = α θ_ref + (1-α) θ_other; joint: the reference's softmax weight). A layer whose mean is
above 1/N leans toward the reference. Over task vectors (a fit with a base model) a coefficient
is the weight of one fine-tune's task vector (base + sum_i c_i tau_i), any real number: each
(tensor, model) gets its own row, and the bins span the values.
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
    multi = metadata.get("mergecli.multi")
    joint = multi == "joint"
    models = json.loads(metadata.get("mergecli.models", "[]"))
    if multi == "task_vectors":
        rows = {f"{name} [{model}]": values[i].float().reshape(-1)
                for name, values in tensors.items() for i, model in enumerate(models)}  # fmt: skip
        low = min(0.0, min(float(v.min()) for v in rows.values()))
        high = max(1.0, max(float(v.max()) for v in rows.values()))
    else:
        rows = {n: (v[0] if joint else v).float().reshape(-1) for n, v in tensors.items()}
        low, high = 0.0, 1.0
    edges = torch.linspace(low, high, params.bins + 1)
    layers = []
    for name, weight in rows.items():
        counts = torch.histc(weight, bins=params.bins, min=low, max=high)
        layers.append({"tensor": name, "count": weight.numel(), "mean": float(weight.mean()),
                       "std": float(weight.std()) if weight.numel() > 1 else 0.0,
                       "histogram": counts.long().tolist()})  # fmt: skip
    even = 1 / max(1, len(models)) if joint or multi == "task_vectors" else 0.5
    state.report.setdefault("analysis", {})["coefficients"] = {
        "reference": models[0] if models else state.reference.name,
        "models": models,
        "multi": metadata.get("mergecli.multi"),
        "even": even,
        "bin_edges": edges.tolist(),
        "layers": layers,
    }
    what = (
        "weight of each task vector"
        if multi == "task_vectors"
        else f"weight of {models[0] if models else 'the reference'}"
    )
    state.log.table(
        f"learned coefficients ({what})",
        ["tensor", "values", Column("mean", show=fixed(3)), Column("std", show=fixed(3))],
        [[r["tensor"], r["count"], r["mean"], r["std"]] for r in layers],
    )
