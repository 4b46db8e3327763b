"""Weight averaging against output ensembling (Wang et al., 2024, arXiv 2411.09263).

Uniform soup: the plain average. Greedy soup (Wortsman et al., 2022): ingredients in order of
their accuracy on the selection split, each kept only if the running average gets more accurate
there. Logit ensemble: the mean of the logits. Feature ensemble: the mean of the penultimate
features (the input of the last Linear layer) fed to the first model's head and to the averaged
head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mergecli.analyze.scoring import Scorer, Split, need_models
from mergecli.errors import MergeCliError
from mergecli.evaluate.metrics import accuracy, cross_entropy, ensemble_logits, logit_ensemble
from mergecli.merge.average import average_state_dicts
from mergecli.recipe.schema import StepParams
from mergecli.registry import step_method
from mergecli.state import MergeState, StateDict


class AveragingParams(StepParams):
    select_on: Split | None = None  # greedy soup's held-out split: fit if present, else eval
    report_on: Split = "eval"
    aligned: bool = True  # use the aligned tensors when an `align` step ran


@step_method("analyze", "averaging_vs_ensembling", AveragingParams, needs=("model", "data"))
def analyze_averaging(state: MergeState, params: AveragingParams) -> None:
    """Uniform and greedy soups against logit, output and feature ensembles."""
    need_models(state, "averaging_vs_ensembling")
    scorer = Scorer(state)
    report_on = scorer.default_split(params.report_on)
    select_on = params.select_on or scorer.default_split("fit")
    models = [
        (c.name, c.aligned_or_original if params.aligned else c.tensors) for c in state.models
    ]
    labels = scorer.labels(report_on)
    rows: list[dict] = []

    def add(name: str, kind: str, logits: Tensor, **extra) -> None:
        rows.append({"name": name, "kind": kind, "accuracy": accuracy(logits, labels),
                     "loss": cross_entropy(logits, labels), **extra})  # fmt: skip

    member_logits = [scorer.logits(sd, report_on) for _, sd in models]
    for (name, _), logits in zip(models, member_logits, strict=True):
        add(name, "model", logits)
    uniform = average_state_dicts([m for _, m in models])
    add("uniform soup", "uniform_soup", scorer.logits(uniform, report_on))
    ingredients, soup, selection = greedy_soup(scorer, models, select_on)
    add("greedy soup", "greedy_soup", scorer.logits(soup, report_on), ingredients=ingredients,
        selected_on=select_on, selection_accuracy=selection)  # fmt: skip
    add("logit ensemble", "logit_ensemble", logit_ensemble(member_logits))
    add("output ensemble", "output_ensemble", ensemble_logits(member_logits))
    first_head, averaged_head = feature_ensemble(scorer, [m for _, m in models], report_on)
    add("feature ensemble (first head)", "feature_ensemble_first_head", first_head)
    add("feature ensemble (averaged head)", "feature_ensemble_averaged_head", averaged_head)
    state.report.setdefault("analysis", {})["averaging_vs_ensembling"] = {
        "split": report_on,
        "aligned": params.aligned and any(c.aligned is not None for c in state.models),
        "results": rows,
    }
    state.log.table(
        f"averaging vs ensembling on data.{report_on}",
        ["model", "accuracy", "loss"],
        [[r["name"], f"{100 * r['accuracy']:.2f}%", f"{r['loss']:.4f}"] for r in rows],
    )


def greedy_soup(
    scorer: Scorer, models: list[tuple[str, StateDict]], split: Split
) -> tuple[list[str], StateDict, dict[str, float]]:
    """Wortsman et al.'s greedy soup: add ingredients by accuracy while the soup improves.

    Returns the chosen ingredients, the soup, and the accuracies on ``split`` of every
    ingredient and of the soup (by name; the soup as "soup").
    """
    scored = sorted(
        ((scorer.score(sd, split)["accuracy"], i) for i, (_, sd) in enumerate(models)),
        key=lambda pair: (-pair[0], pair[1]),
    )
    best_accuracy, first = scored[0]
    chosen = [first]
    soup = models[first][1]
    for _, index in scored[1:]:
        candidate = average_state_dicts([models[i][1] for i in [*chosen, index]])
        candidate_accuracy = scorer.score(candidate, split)["accuracy"]
        if candidate_accuracy > best_accuracy:
            chosen.append(index)
            soup, best_accuracy = candidate, candidate_accuracy
    selection = {models[i][0]: accuracy for accuracy, i in scored}
    selection["soup"] = best_accuracy
    return [models[i][0] for i in chosen], soup, selection


@torch.no_grad()
def feature_ensemble(
    scorer: Scorer, models: list[StateDict], split: Split
) -> tuple[Tensor, Tensor]:
    """Mean penultimate features, through the first model's head and through the mean head."""
    head_name, head = _head(scorer.module)
    features = []
    captured: list[Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].float().cpu()))
    try:
        for state_dict in models:
            captured.clear()
            scorer.logits(state_dict, split)
            features.append(torch.cat(captured))
    finally:
        hook.remove()
    mean_features = torch.stack(features).mean(0)
    prefix = f"{head_name}." if head_name else ""

    def head_output(weight: Tensor, bias: Tensor | None) -> Tensor:
        out = mean_features @ weight.float().T
        return out + bias.float() if bias is not None else out

    def head_of(sd: StateDict) -> tuple[Tensor, Tensor | None]:
        return sd[prefix + "weight"], sd.get(prefix + "bias")

    first = head_output(*head_of(models[0]))
    weights = torch.stack([head_of(m)[0].float() for m in models]).mean(0)
    biases = [head_of(m)[1] for m in models]
    bias = None if biases[0] is None else torch.stack([b.float() for b in biases]).mean(0)
    return first, head_output(weights, bias)


def _head(module: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise MergeCliError(
            "analyze averaging_vs_ensembling: the feature ensemble needs a final nn.Linear "
            f"layer (the head), and {type(module).__name__} has none"
        )
    return linears[-1]
