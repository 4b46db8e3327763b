"""What scaling the weights does to single models, their average and their ensemble.

Wang et al. (2024, arXiv 2411.09263) scale parameters by c to test whether weight averaging
works because averaged weights shrink. Every floating parameter and buffer is multiplied by c,
except BatchNorm running variances, which scale by c² (they are variances of values that scale
by c); integer buffers (BN batch counters) never change.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mergecli.analyze.scoring import Scorer, Split, need_models
from mergecli.evaluate.metrics import accuracy, ensemble_logits
from mergecli.merge.average import average_state_dicts
from mergecli.recipe.schema import StepParams
from mergecli.registry import step_method
from mergecli.state import MergeState, StateDict

Target = Literal["all", "first", "all_but_last"]
RULE = "floating parameters and buffers x c; BatchNorm running_var x c^2; integer buffers unchanged"


class ScalingParams(StepParams):
    factors: list[float] = Field(default_factory=lambda: [0.5, 0.9, 1.1, 2.0, 10.0])
    apply_to: list[Target] = Field(default_factory=lambda: ["all", "first", "all_but_last"])
    split: Split = "eval"
    aligned: bool = True  # average the aligned tensors when an `align` step ran


def scale_state_dict(state_dict: StateDict, c: float) -> StateDict:
    """Every floating tensor times c (BatchNorm running variances times c²)."""
    return {
        name: t * (c * c if name.endswith("running_var") else c) if t.is_floating_point() else t
        for name, t in state_dict.items()
    }


@step_method("analyze", "scaling", ScalingParams, needs=("model", "data"))
def analyze_scaling(state: MergeState, params: ScalingParams) -> None:
    """Accuracy and agreement with the unscaled predictions, for models, average and ensemble."""
    need_models(state, "scaling", minimum=1)
    scorer = Scorer(state)
    split = scorer.default_split(params.split)
    labels = scorer.labels(split)
    models = [
        (c.name, c.aligned_or_original if params.aligned else c.tensors) for c in state.models
    ]
    n = len(models)
    unscaled = [scorer.logits(sd, split) for _, sd in models]
    reference = {
        "average": scorer.logits(average_state_dicts([sd for _, sd in models]), split),
        "ensemble": ensemble_logits(unscaled),
    }
    for (name, _), logits in zip(models, unscaled, strict=True):
        reference[name] = logits
    rows: list[dict] = []
    for c in params.factors:
        scaled_models = [scale_state_dict(sd, c) for _, sd in models]
        scaled_logits = [scorer.logits(sd, split) for sd in scaled_models]
        for target in params.apply_to:
            chosen = {"all": range(n), "first": range(1), "all_but_last": range(n - 1)}[target]
            members = [scaled_logits[i] if i in chosen else unscaled[i] for i in range(n)]
            weights = [scaled_models[i] if i in chosen else models[i][1] for i in range(n)]
            subjects = {name: members[i] for i, (name, _) in enumerate(models) if i in chosen}
            if n > 1:
                subjects["average"] = scorer.logits(average_state_dicts(weights), split)
                subjects["ensemble"] = ensemble_logits(members)
            for subject, logits in subjects.items():
                agreement = (logits.argmax(1) == reference[subject].argmax(1)).float().mean()
                rows.append({"factor": c, "apply_to": target, "subject": subject,
                             "accuracy": accuracy(logits, labels),
                             "agreement": float(agreement)})  # fmt: skip
    state.report.setdefault("analysis", {})["scaling"] = {
        "split": split,
        "rule": RULE,
        "unscaled_accuracy": {k: accuracy(v, labels) for k, v in reference.items()},
        "results": rows,
    }
    state.log.info(f"analyze scaling: {len(rows)} results ({RULE})")
