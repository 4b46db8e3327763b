"""The `zipit` align method (ZipIt!, Stoica et al., 2024): every model, the reference too, mapped
into a zipped basis whose plain average is the zipped model; its partial zip; its baseline."""

from __future__ import annotations

import itertools
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from mergecli.align.activation_matching import match_activations, match_unread_heads
from mergecli.align.activations import PairStatistics
from mergecli.align.groups import PermutationSpec
from mergecli.align.step import (
    AlignParams,
    Target,
    align_models,
    fit_statistics,
    permutation_only_groups,
    permutation_spec,
    warn_without_reset_bn,
    weight_distance,
)
from mergecli.align.transform import Transforms, apply_transforms
from mergecli.align.zipit import correlation_from_covariance, zip_features
from mergecli.errors import MergeCliError, RecipeError
from mergecli.evaluate.metrics import accuracy, collect_logits, cross_entropy
from mergecli.recipe.schema import Recipe, shown_default
from mergecli.registry import step_method
from mergecli.state import Checkpoint, MergeState, StateDict

_NEEDS_A_CLASSIFIER = (
    "a list is searched by the zips' accuracy on data.fit, which needs a classifier's labels; "
    "give one alpha and one beta"
)


class ZipItParams(AlignParams):
    # A list of values is searched (every pair of alpha and beta), as the paper tunes them.
    alpha: float | list[float] = Field(
        default=0.3, description="a merged feature's score is alpha times its parts' lowest"
    )
    beta: Annotated[float, Field(ge=0)] | list[Annotated[float, Field(ge=0)]] = Field(
        default=0.125, description="same-model merges per model, as a fraction"
    )
    batches: int | None = Field(
        default=None, ge=1, json_schema_extra=shown_default("all of data.fit")
    )
    partial: str | None = Field(
        default=None,
        description="zip the groups up to this one (align-spec's order); match the rest",
        json_schema_extra=shown_default("every group"),
    )

    def recipe_problems(self, recipe: Recipe) -> list[tuple[tuple[str | int, ...], str]]:
        """A search of alpha or beta on token data (text, or an LM dataset): no labels."""
        fit = recipe.data.fit
        searched = [k for k in ("alpha", "beta") if isinstance(getattr(self, k), list)]
        tokens = fit is not None and (fit.source == "text" or fit.task == "lm")
        problems = super().recipe_problems(recipe)
        return (
            [*problems, ((searched[0],), _NEEDS_A_CLASSIFIER)] if searched and tokens else problems
        )


@step_method("align", "zipit", ZipItParams, needs=("model", "data.fit"))
def align_zipit(state: MergeState, params: ZipItParams) -> None:
    """ZipIt! (Stoica et al., 2024): features merged across and within models, by correlation."""
    spec = permutation_spec(state)
    fallback = permutation_only_groups(spec, state, "zipit", params)
    warn_without_reset_bn(state, spec, fallback, "zipit")
    _warn_unless_averaged(state)
    zipped: dict[str, Transforms] = {}
    within: dict[str, dict[str, int]] = {}
    search: list[dict[str, float]] = []

    def transforms_of(spec: PermutationSpec, target: Target, other: Checkpoint) -> Transforms:
        if not zipped:  # one zip of all models, computed when the first model asks
            stats = _pair_statistics(state, params, spec)
            chosen = _search(state, params, spec, fallback, stats, search)
            zipped.update(zipit_transforms(state, chosen, spec, fallback, within, stats))
        return zipped[other.name]

    zipped_groups = _zipped_groups(spec, params.partial, fallback)  # a wrong name fails first
    if params.partial is not None:
        trunk_tensors(spec, zipped_groups)  # and so does a stop inside a residual stage
    align_models(state, params, "zipit", transforms_of, reference_moves=True)
    if params.partial is not None:
        _share_the_trunk(state, spec, zipped_groups)
    chosen = next((row for row in search if row.get("chosen")), None)
    state.report["align"]["zipit"] = {
        "alpha": chosen["alpha"] if chosen else params.alpha,
        "beta": chosen["beta"] if chosen else params.beta,
        **({"search": search} if search else {}),
        "zipped": sorted(zipped_groups),
        "within_model_merges": within,
    }


def zipit_merge(state: MergeState, params: ZipItParams) -> StateDict:
    """ZipIt!'s merge of the checkpoints as loaded, by itself (an `evaluate` baseline): every
    model zipped, then their plain average (with ``partial``, the zipped layers are shared)."""
    spec = permutation_spec(state)
    fallback = permutation_only_groups(spec)
    trunk_tensors(spec, _zipped_groups(spec, params.partial, fallback))  # checks the stop
    stats = _pair_statistics(state, params, spec)
    chosen = _search(state, params, spec, fallback, stats, [])
    return _average(state, spec, zipit_transforms(state, chosen, spec, fallback, {}, stats))


def _zipped_groups(spec: PermutationSpec, partial: str | None, fallback: set[str]) -> set[str]:
    """The groups ZipIt! zips: all but the permutation-only ones, or with ``partial`` those up
    to and including that group in the spec's order (align-spec lists them so)."""
    names = [g.name for g in spec.groups]
    if partial is not None and partial not in names:
        raise RecipeError(
            [
                f"align.partial: the model has no group '{partial}'; name one of its groups "
                f"(`mergecli align-spec RECIPE` lists them): {', '.join(names)}"
            ]
        )
    upto = names if partial is None else names[: names.index(partial) + 1]
    return {name for name in upto if name not in fallback}


def trunk_tensors(spec: PermutationSpec, zipped: set[str]) -> list[str]:
    """The tensors of a partial zip's zipped layers: those whose units are all in ``zipped``
    groups, bar a layer that only reads zipped units (the first of the later layers)."""
    groups_of: dict[str, list[tuple[str, str]]] = {}
    for group in spec.groups:
        for m in group.members:
            groups_of.setdefault(m.tensor, []).append((group.name, m.role))
    trunk = []
    for tensor, members in groups_of.items():
        zipped_here = [(g, role) for g, role in members if g in zipped]
        later = [g for g, _ in members if g not in zipped]
        if not zipped_here or all(role == "in" for _, role in zipped_here):
            continue
        if later:
            raise MergeCliError(
                f"align.partial: {tensor} makes zipped units ({zipped_here[0][0]}) from "
                f"units of '{later[0]}', which is not zipped; stop the zip where no zipped layer "
                "reads a later group (at the end of a stage, as the paper does)"
            )
        trunk.append(tensor)
    return trunk


def _share_the_trunk(state: MergeState, spec: PermutationSpec, zipped: set[str]) -> None:
    """Partial zipping (ZipIt!, Sec. 5): every model gets the zipped layers (their average)
    and keeps its own later layers, the first of which reads the zipped units through the
    model's unmerge U_m: each aligned model is one head of the paper's multi-head model, and
    their output ensemble is that model. A layer whose outputs are zipped but that reads units
    of an unzipped group has no such split."""
    models = state.models
    for tensor in trunk_tensors(spec, zipped):
        present = [c for c in models if tensor in c.aligned]
        shared = sum(c.aligned[tensor].double() for c in present) / len(present)
        for c in present:
            c.aligned[tensor] = shared.to(c.aligned[tensor].dtype)
    for checkpoint in models:
        if checkpoint is not state.reference:
            distance = state.report["align"]["weight_distance"][checkpoint.name]
            distance["after"] = weight_distance(state.reference.aligned, checkpoint.aligned)


def zipit_transforms(
    state: MergeState,
    params: ZipItParams,
    spec: PermutationSpec,
    fallback: set[str],
    within: dict[str, dict[str, int]],
    stats: dict[tuple[int, int], dict[str, PairStatistics]] | None = None,
) -> dict[str, Transforms]:
    """Every merged model's transforms by name (the reference's too: the zipped basis is
    new), with one ``alpha`` and ``beta``; ``within`` gets the same-model merges per group and
    model. ``stats``: the pairs' activation statistics, when already read."""
    models = _in_zip_order(state)
    stats = _pair_statistics(state, params, spec) if stats is None else stats
    transforms: dict[str, Transforms] = {m.name: {} for m in models}
    zipped = _zipped_groups(spec, params.partial, fallback)
    for group in spec.groups:
        if group.name not in zipped or group.name not in stats[0, 1]:
            continue
        covariance = _joint_covariance({k: s[group.name] for k, s in stats.items()}, len(models))
        zip_ = zip_features(
            correlation_from_covariance(covariance), len(models), params.alpha, params.beta
        )
        if zip_.merge.shape[0] != group.size:
            raise MergeCliError(
                f"zipit: group '{group.name}' could not be zipped to {group.size} units: with "
                f"alpha {params.alpha} (<= 0) its merged features may not merge again and no "
                "pairs are left; use alpha > 0"
            )
        for index, model in enumerate(models):
            transforms[model.name][group.name] = zip_.transform(index)
        within[group.name] = {m.name: n for m, n in zip(models, zip_.within_merges, strict=True)}
    for index, model in enumerate(models):
        if index == 0:
            perms = {g.name: torch.arange(g.size) for g in spec.groups}
        else:  # the groups that are not zipped: matched to the reference, as activation matching
            pair = {n: s for n, s in stats[0, index].items() if n not in zipped}
            perms = match_activations(pair, spec=spec)
            perms = match_unread_heads(
                spec, perms, stats[0, index], models[0].tensors, model.tensors
            )
        for name, perm in perms.items():
            transforms[model.name].setdefault(name, perm)
    return transforms


def _in_zip_order(state: MergeState) -> list[Checkpoint]:
    """The merged models, the reference first (its units number the zipped ones first)."""
    return [state.reference] + [c for c in state.models if c is not state.reference]


def _pair_statistics(
    state: MergeState, params: ZipItParams, spec: PermutationSpec
) -> dict[tuple[int, int], dict[str, PairStatistics]]:
    """Activation statistics of every pair of models on data.fit, by their zip order."""
    models = _in_zip_order(state)
    return {
        (i, j): fit_statistics(
            state, spec, Target(models[i].name, models[i].tensors), models[j], params.batches
        )
        for i in range(len(models))
        for j in range(i + 1, len(models))
    }


def _search(
    state: MergeState,
    params: ZipItParams,
    spec: PermutationSpec,
    fallback: set[str],
    stats: dict[tuple[int, int], dict[str, PairStatistics]],
    rows: list[dict[str, float]],
) -> ZipItParams:
    """With lists of alpha or beta values, the pair whose zipped average is most accurate on
    data.fit (lower loss on a tie), as the paper tunes them on held-out data; ``rows`` gets
    every pair's scores. The zips are scored as they are, before any repair step."""
    alphas = params.alpha if isinstance(params.alpha, list) else [params.alpha]
    betas = params.beta if isinstance(params.beta, list) else [params.beta]
    if len(alphas) * len(betas) == 1:
        return params.model_copy(update={"alpha": alphas[0], "beta": betas[0]})
    data = state.data("fit")
    if data.mask is not None or data.x.dtype == torch.int64:
        raise RecipeError([f"align.alpha/beta: {_NEEDS_A_CLASSIFIER}"])
    module = state.build_module()
    for alpha, beta in itertools.product(alphas, betas):
        candidate = params.model_copy(update={"alpha": alpha, "beta": beta})
        transforms = zipit_transforms(state, candidate, spec, fallback, {}, stats)
        merged = _average(state, spec, transforms)
        logits = collect_logits(module, merged, data, state.batch_size("fit"), state.device)
        row = {"alpha": alpha, "beta": beta, "accuracy": accuracy(logits, data.y),
               "loss": cross_entropy(logits, data.y)}  # fmt: skip
        state.log.info(
            f"zipit: alpha {alpha:g}, beta {beta:g}: accuracy {row['accuracy']:.4f} on data.fit"
        )
        rows.append(row)
    winner = max(rows, key=lambda r: (r["accuracy"], -r["loss"]))
    winner["chosen"] = True
    return params.model_copy(update={"alpha": winner["alpha"], "beta": winner["beta"]})


def _average(state: MergeState, spec: PermutationSpec, transforms: dict[str, Transforms]):
    """The zipped models' plain average: ZipIt!'s merged model."""
    mapped = [apply_transforms(c.tensors, spec, transforms[c.name]) for c in state.models]
    return {
        name: (sum(m[name].double() for m in mapped) / len(mapped)).to(tensor.dtype)
        if tensor.is_floating_point()
        else tensor
        for name, tensor in state.reference.tensors.items()
    }


def _joint_covariance(stats: dict[tuple[int, int], PairStatistics], n: int) -> Tensor:
    """The covariance of ``n`` models' units side by side, from the statistics of each pair."""
    blocks: dict[tuple[int, int], Tensor] = {}
    for (i, j), s in stats.items():
        cxx, cyy, cxy = s.covariances()
        blocks[i, i], blocks[j, j], blocks[i, j], blocks[j, i] = cxx, cyy, cxy, cxy.T
    return torch.cat([torch.cat([blocks[i, j] for j in range(n)], 1) for i in range(n)], 0)


def _warn_unless_averaged(state: MergeState) -> None:
    """ZipIt!'s merge is the zipped models' plain average; say so when the recipe merges
    them another way."""
    merges = [s for s in state.steps_after() if s.kind == "merge"]
    if merges and merges[0].method != "average":
        state.log.warn(
            f"zipit: the zipped models are merged by {merges[0].method}; ZipIt!'s merge is "
            "their plain average (`merge: average`), each zipped model alone is not a model"
        )
