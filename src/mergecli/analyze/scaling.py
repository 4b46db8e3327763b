"""What scaling the weights does to single models, their average and their ensembles.

Wang et al. (2024, arXiv 2411.09263) scale parameters by c to test whether weight averaging
works because averaged weights shrink, and compare the uniform soup with the logit and the
feature ensemble. Every floating parameter and buffer is multiplied by c, except BatchNorm
running variances, which scale by c² (they are variances of values that scale by c); integer
buffers (BN batch counters) never change. Accuracies count a tie between k classes as 1/k
correct: at large c a softmax saturates, and the output ensemble of two disagreeing one-hots
ties exactly (argmax would hand every such tie to class 0).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from mergecli.analyze.ensembles import ensembles, head_of
from mergecli.analyze.scoring import Scorer, Split, data_labels, model_head, need_models
from mergecli.evaluate.metrics import expected_accuracy
from mergecli.merge.average import average_state_dicts
from mergecli.recipe.schema import Recipe, StepParams
from mergecli.registry import step_method
from mergecli.state import MergeState, StateDict

Target = Literal["all", "first", "last", "all_but_first", "all_but_last"]
RULE = "floating parameters and buffers x c; BatchNorm running_var x c^2; integer buffers unchanged"
# With two models `last` is the paper's third setting: its code scales only the last model of
# an ensemble and all but the first of a soup, the same model when there are two.
DEFAULT_TARGETS: tuple[Target, ...] = ("all", "first", "last")


class ScalingParams(StepParams):
    factors: list[float] = Field(default_factory=lambda: [0.5, 0.9, 1.1, 2.0, 10.0])
    # Which models are scaled (in checkpoint order); default: all, first, last.
    apply_to: list[Target] | None = Field(default=None, min_length=1)
    split: Split = "eval"
    aligned: bool = True  # average the aligned tensors when an `align` step ran

    def recipe_problems(self, recipe: Recipe) -> list[tuple[tuple[str | int, ...], str]]:
        n = sum(1 for c in recipe.checkpoints if c.role != "base")
        seen: dict[tuple[int, ...], Target] = {}
        for i, target in enumerate(self.apply_to or []):
            chosen = tuple(scaled_models(target, n))
            if not chosen:
                return [(("apply_to", i), f"{target} scales no model with {n} to merge")]
            if chosen in seen:
                return [(("apply_to", i), f"{seen[chosen]} and {target} scale the same "
                         f"models with {n} to merge; list one of them")]  # fmt: skip
            seen[chosen] = target
        return []


def scaled_models(target: Target, n: int) -> range:
    """The indices (in checkpoint order, the base excluded) that ``target`` scales."""
    return {"all": range(n), "first": range(min(1, n)), "last": range(n - 1, n),
            "all_but_first": range(1, n), "all_but_last": range(n - 1)}[target]  # fmt: skip


def scale_state_dict(state_dict: StateDict, c: float) -> StateDict:
    """Every floating tensor times c (BatchNorm running variances times c²)."""
    return {
        name: t * (c * c if name.endswith("running_var") else c) if t.is_floating_point() else t
        for name, t in state_dict.items()
    }


@step_method("analyze", "scaling", ScalingParams, needs=("model", "data"))
def analyze_scaling(state: MergeState, params: ScalingParams) -> None:
    """Accuracy and agreement with the unscaled predictions: models, average and ensembles."""
    need_models(state, "scaling", minimum=1)
    scorer = Scorer(state)
    split = scorer.default_split(params.split)
    labels = scorer.labels(split)
    head_name, _ = model_head(scorer.module)
    models = [
        (c.name, c.aligned_or_original if params.aligned else c.tensors) for c in state.models
    ]
    n = len(models)
    targets = params.apply_to or list(dict.fromkeys(t for t in DEFAULT_TARGETS
                                                    if _first_with(t, n) == t))  # fmt: skip

    def subjects(weights: list[StateDict], outputs: list[tuple[Tensor, Tensor]],
                 shown: range) -> dict[str, Tensor]:  # fmt: skip
        """Logits of the shown single models, and of the average and ensembles of all."""
        found = {models[i][0]: outputs[i][0] for i in shown}
        if n > 1:
            found["average"] = scorer.logits(average_state_dicts(weights), split)
            heads = [head_of(sd, head_name) for sd in weights]
            found |= ensembles([o[0] for o in outputs], [o[1] for o in outputs], heads)
        return found

    unscaled_outputs = [scorer.outputs(sd, split) for _, sd in models]
    reference = subjects([sd for _, sd in models], unscaled_outputs, range(n))
    predicted = {name: logits.argmax(1) for name, logits in reference.items()}
    rows: list[dict] = []
    for c in params.factors:
        scaled = [scale_state_dict(sd, c) for _, sd in models]
        scaled_outputs = [scorer.outputs(sd, split) for sd in scaled]
        for target in targets:
            chosen = scaled_models(target, n)
            weights = [scaled[i] if i in chosen else models[i][1] for i in range(n)]
            outputs = [scaled_outputs[i] if i in chosen else unscaled_outputs[i] for i in range(n)]
            for subject, logits in subjects(weights, outputs, chosen).items():
                agreement = expected_accuracy(logits, predicted[subject])
                rows.append({"factor": c, "apply_to": target, "subject": subject,
                             "accuracy": expected_accuracy(logits, labels),
                             "agreement": agreement})  # fmt: skip
    state.report.setdefault("analysis", {})["scaling"] = {
        "split": split,
        "data": data_labels(state),
        "rule": RULE,
        "models": [name for name, _ in models],
        "unscaled_accuracy": {k: expected_accuracy(v, labels) for k, v in reference.items()},
        "results": rows,
    }
    state.log.info(f"analyze scaling: {len(rows)} results ({RULE})")


def _first_with(target: Target, n: int) -> Target:
    """The first default target that scales the same models as ``target`` (one panel each)."""
    return next(t for t in DEFAULT_TARGETS if scaled_models(t, n) == scaled_models(target, n))
