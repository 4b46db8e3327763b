"""Weight averaging against output ensembling (Wang et al., 2024, arXiv 2411.09263).

Uniform soup: the plain average. Greedy soup (Wortsman et al., 2022): ingredients in order of
their accuracy on held-out data (`select_on`, data.fit by default), each kept only if the
running average gets more accurate there; reported, like everything else, on `report_on`
(data.eval), never on the data it was selected on. The ensembles are those of
`mergecli.analyze.ensembles`. Any merge method can join them as a baseline row, named as in
`evaluate` (`mergecli.evaluate.baselines`).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from mergecli.analyze.ensembles import KINDS, ensembles, head_of
from mergecli.analyze.scoring import Scorer, Split, data_labels, model_head, need_models
from mergecli.evaluate.baselines import Baseline, baseline_problems, merge_baseline_model
from mergecli.evaluate.metrics import cross_entropy, expected_accuracy
from mergecli.merge.average import average_state_dicts
from mergecli.recipe.schema import Recipe, StepParams
from mergecli.registry import step_method
from mergecli.runtime.log import Column, fixed, percent
from mergecli.state import MergeState, StateDict


class AveragingParams(StepParams):
    select_on: Split = "fit"  # where the greedy soup picks its ingredients (held out)
    report_on: Split = "eval"  # where every result is measured
    aligned: bool = True  # use the aligned tensors when an `align` step ran
    # Merge methods beside the soups, as `evaluate` names them (`ties`, `{regmean: {alpha: 0.5}}`,
    # `aligned_fisher`); none by default.
    baselines: list[Baseline] = Field(default_factory=list)

    def recipe_problems(self, recipe: Recipe) -> list[tuple[tuple[str | int, ...], str]]:
        return self._split_problems(recipe) + baseline_problems(self.baselines, recipe)

    def _split_problems(self, recipe: Recipe) -> list[tuple[tuple[str | int, ...], str]]:
        if self.select_on == self.report_on:
            return [(("select_on",), f"the greedy soup would pick its ingredients on "
                     f"data.{self.report_on}, the data it is reported on; select on held-out "
                     "data: `select_on: fit, report_on: eval` (the defaults)")]  # fmt: skip
        if recipe.data.fit is None and recipe.data.eval is None:
            return []  # "needs data" says it already
        return [
            ((key,), f"data.{split} is missing: the greedy soup picks its ingredients on "
             f"data.{self.select_on} and is reported on data.{self.report_on}, which must differ;"
             f" add `data: {{{split}: {{source: ...}}}}` (held out from data.{other})")
            for key, split, other in (("select_on", self.select_on, self.report_on),
                                      ("report_on", self.report_on, self.select_on))
            if getattr(recipe.data, split) is None
        ]  # fmt: skip


@step_method("analyze", "averaging_vs_ensembling", AveragingParams, needs=("model", "data"))
def analyze_averaging(state: MergeState, params: AveragingParams) -> None:
    """Uniform and greedy soups against output, logit and feature ensembles."""
    need_models(state, "averaging_vs_ensembling")
    scorer = Scorer(state)
    report_on, select_on = params.report_on, params.select_on
    models = [
        (c.name, c.aligned_or_original if params.aligned else c.tensors) for c in state.models
    ]
    labels = scorer.labels(report_on)
    rows: list[dict] = []

    def add(name: str, kind: str, logits: Tensor, **extra) -> None:
        rows.append({"name": name, "kind": kind, "accuracy": expected_accuracy(logits, labels),
                     "loss": cross_entropy(logits, labels), **extra})  # fmt: skip

    outputs = [scorer.outputs(sd, report_on) for _, sd in models]
    for (name, _), (logits, _) in zip(models, outputs, strict=True):
        add(name, "model", logits)
    uniform = average_state_dicts([m for _, m in models])
    add("uniform soup", "uniform_soup", scorer.logits(uniform, report_on))
    ingredients, soup, selection = greedy_soup(scorer, models, select_on)
    add("greedy soup", "greedy_soup", scorer.logits(soup, report_on), ingredients=ingredients,
        selected_on=select_on, selection_accuracy=selection)  # fmt: skip
    for baseline in params.baselines:
        # Made, scored and dropped before the next is made: one merge in memory at a time.
        label, method, merged = merge_baseline_model(state, baseline, "analyze")
        add(label, "merge", scorer.logits(merged, report_on), method=method)
        del merged
    head_name, _ = model_head(scorer.module)
    heads = [head_of(sd, head_name) for _, sd in models]
    combined = ensembles([o[0] for o in outputs], [o[1] for o in outputs], heads)
    for name, logits in combined.items():
        add(name, KINDS[name], logits)
    state.report.setdefault("analysis", {})["averaging_vs_ensembling"] = {
        "split": report_on,
        "selected_on": select_on,
        "data": data_labels(state),
        "aligned": params.aligned and any(c.aligned is not None for c in state.models),
        "results": rows,
    }
    state.log.table(
        f"averaging vs ensembling on data.{report_on} (greedy soup selected on data.{select_on})",
        ["model", Column("accuracy", "accuracy_fraction", percent), Column("loss", show=fixed(4))],
        [[r["name"], r["accuracy"], r["loss"]] for r in rows],
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
