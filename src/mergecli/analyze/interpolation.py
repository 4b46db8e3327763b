"""Loss and accuracy along straight lines between models, and the barrier on them.

The barrier (Frankle et al., 2020; Entezari et al., 2022) of a path θ(λ) = (1-λ) θ_A + λ θ_B
is max over λ of L(θ(λ)) - [(1-λ) L(θ_A) + λ L(θ_B)]; the midpoint variant takes λ = 1/2.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergecli.analyze.scoring import Scorer, data_labels, interpolate, need_models
from mergecli.errors import MergeCliError
from mergecli.merge.average import average_state_dicts
from mergecli.recipe.schema import StepParams
from mergecli.registry import step_method
from mergecli.runtime.log import Column, fixed
from mergecli.state import MergeState, StateDict

Path = Literal["naive", "aligned", "fit"]


class InterpolationParams(StepParams):
    points: int = Field(default=25, ge=3)
    # Default: every path that applies (aligned after `align`, fit after `fit`).
    paths: list[Path] | None = None
    reset_bn: bool = True  # recompute BatchNorm statistics at every point (needs data.fit)


@step_method("analyze", "interpolation", InterpolationParams, needs=("model", "data"))
def analyze_interpolation(state: MergeState, params: InterpolationParams) -> None:
    """Interpolation curves and barriers: naive, aligned, and aligned average -> NP Merge."""
    need_models(state, "interpolation")
    first, second = state.models[0], state.models[1]
    aligned = second.aligned
    available: dict[str, tuple[str, str, StateDict, StateDict]] = {
        "naive": (first.name, second.name, first.tensors, second.tensors)
    }
    if aligned is not None:
        # The reference's own aligned tensors: the same function, maybe reparametrised (cca's
        # batchnorm: fold), in the basis the other was mapped into.
        start = first.aligned_or_original
        available["aligned"] = (first.name, f"{second.name} (aligned)", start, aligned)
    if "fit" in state.report and isinstance(state.merged, dict):
        average = average_state_dicts([c.aligned_or_original for c in state.models])
        available["fit"] = ("aligned average", "NP Merge", average, state.merged)
    wanted = params.paths or list(available)
    missing = [p for p in wanted if p not in available]
    if missing:
        needs = {"aligned": "an `align` step", "fit": "a `fit` step"}
        raise MergeCliError(
            f"analyze interpolation: path {missing[0]} needs {needs[missing[0]]} before it"
        )
    scorer = Scorer(state, reset_bn=params.reset_bn)
    lambdas = torch.linspace(0, 1, params.points).tolist()
    result: dict = {"lambdas": lambdas, "bn_reset": scorer.reset_bn, "data": data_labels(state),
                    "paths": {}}  # fmt: skip
    for name in state.log.progress(wanted, len(wanted), "interpolating"):
        start_name, end_name, start, end = available[name]
        curves = {split: {"loss": [], "accuracy": []} for split in scorer.splits}
        for lam in lambdas:
            weights = interpolate(start, end, lam)
            for split in scorer.splits:
                scores = scorer.score(weights, split)
                curves[split]["loss"].append(scores["loss"])
                curves[split]["accuracy"].append(scores["accuracy"])
        for split, curve in curves.items():
            midpoint = scorer.score(interpolate(start, end, 0.5), split)
            curve.update(barriers(lambdas, curve["loss"], curve["accuracy"], midpoint))
        result["paths"][name] = {"from": start_name, "to": end_name, **curves}
    state.report.setdefault("analysis", {})["interpolation"] = result
    rows = [
        [name, split, *([c["loss_barrier"], c["loss_barrier_midpoint"], c["accuracy_barrier"]]
                        if has_barrier(name) else [None] * 3)]
        for name, path in result["paths"].items()
        for split, c in path.items()
        if isinstance(c, dict)
    ]  # fmt: skip
    # No barrier on the fit path (None): "—" for people, null in JSON.
    columns = [
        Column("path", name=True),
        Column("data", name=True),
        Column("loss barrier", "loss_barrier", fixed(4), "—"),
        Column("at λ=½", "loss_barrier_midpoint", fixed(4), "—"),
        Column("acc drop (pts)", "accuracy_drop_fraction", lambda v: f"{100 * v:.2f}", "—"),
    ]
    state.log.table("interpolation barriers", columns, rows)


def has_barrier(path: str) -> bool:
    """Whether a path joins two trained models: the `fit` path starts at an average that was
    never trained, so a barrier (a bump above the line between its ends) means nothing there."""
    return path != "fit"


def barriers(
    lambdas: list[float], losses: list[float], accuracies: list[float], midpoint: dict
) -> dict[str, float]:
    """Loss barrier (max and at λ=½) and accuracy barrier (the largest drop below the line)."""
    lam = torch.tensor(lambdas, dtype=torch.float64)
    loss = torch.tensor(losses, dtype=torch.float64)
    acc = torch.tensor(accuracies, dtype=torch.float64)
    loss_line = (1 - lam) * loss[0] + lam * loss[-1]
    acc_line = (1 - lam) * acc[0] + lam * acc[-1]
    return {
        "loss_barrier": float((loss - loss_line).max()),
        "loss_barrier_midpoint": midpoint["loss"] - (losses[0] + losses[-1]) / 2,
        "accuracy_barrier": float((acc_line - acc).max()),
    }
