"""The `align` step: bring every merged model into the reference's basis of hidden units."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Literal, NamedTuple

import torch
from pydantic import ConfigDict, Field

from mergecli.align.activation_matching import match_activations, match_unread_heads
from mergecli.align.activations import PairStatistics, check_finite, pair_statistics
from mergecli.align.cca import cca_transform, constant_units
from mergecli.align.groups import PermutationSpec
from mergecli.align.heads import is_head_permutation
from mergecli.align.permute import check_spec
from mergecli.align.spec import derive_spec
from mergecli.align.transform import BatchNormMapping, Transforms, apply_transforms, fold_norms
from mergecli.align.weight_matching import MatchingStats, weight_matching
from mergecli.errors import MergeCliError
from mergecli.models.metadata import model_metadata
from mergecli.recipe.schema import StepParams, StepSpec, shown_default
from mergecli.registry import step_method
from mergecli.runtime.distributed import current as current_world
from mergecli.state import Checkpoint, MergeState, StateDict

ALIGNMENT_FILE = "alignment.safetensors"


class Target(NamedTuple):
    """The model whose basis another is brought into: the reference, or in a pairwise fit's
    later stages the running merge."""

    name: str
    tensors: StateDict


class AlignParams(StepParams):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: str | None = Field(
        default=None, alias="from", description="reuse transforms saved by an earlier run"
    )
    save_aligned: bool = False


class WeightMatchingParams(AlignParams):
    max_iter: int = Field(default=100, ge=1)
    restarts: int = Field(default=1, ge=1, description="seeded visiting orders; best kept")


class ActivationMatchingParams(AlignParams):
    statistic: Literal["correlation", "cross_moment"] = "correlation"
    batches: int | None = Field(
        default=None, ge=1, json_schema_extra=shown_default("all of data.fit")
    )


class CCAParams(AlignParams):
    gamma: float = Field(default=1.0, ge=0)
    batches: int | None = Field(
        default=None, ge=1, json_schema_extra=shown_default("all of data.fit")
    )
    # paper: M on a conv's outputs and its BatchNorm's affine and mean, as CCA Merge does;
    # fold: the norm's scale folded into the conv first, so M acts where CCA measured it.
    batchnorm: BatchNormMapping = "paper"


def permutation_spec(state: MergeState) -> PermutationSpec:
    """Derive, check and remember the permutation spec of the recipe's model."""
    if state.permutation_spec is None:
        module = state.build_module()
        example = state.example_input().to(state.device)
        spec = derive_spec(module, example)
        for warning in spec.warnings:
            state.log.warn(warning)
        check_spec(module, spec, example)
        state.permutation_spec = spec
    return state.permutation_spec


@step_method("align", "weight_matching", WeightMatchingParams, needs=("model",), default=True)
def align_weight_matching(state: MergeState, params: WeightMatchingParams) -> None:
    """Weight matching (Git Re-Basin, Ainsworth et al., 2023): permutations from weights alone."""
    stats: dict[str, MatchingStats] = {}
    align_models(
        state, params, "weight_matching", partial(weight_matching_transforms, state, params, stats)
    )
    state.report["align"]["sweeps"] = max((s.sweeps for s in stats.values()), default=0)
    state.report["align"]["lap_seconds"] = round(sum(s.lap_seconds for s in stats.values()), 4)
    if stats:  # none when the transforms came from an earlier run (from:)
        state.report["align"]["matching"] = {
            name: {
                "objective": s.objectives[s.best_restart],
                "restart_objectives": s.objectives,
                "best_restart": s.best_restart,
                "sweeps": s.sweeps,
            }
            for name, s in stats.items()
        }


def weight_matching_transforms(
    state: MergeState,
    params: WeightMatchingParams,
    stats: dict[str, MatchingStats] | None,
    spec: PermutationSpec,
    target: Target,
    other: Checkpoint,
) -> Transforms:
    """Weight matching (Ainsworth et al., 2023) of ``other`` to ``target``; its matching
    statistics go to ``stats[other.name]`` when given."""
    matching = MatchingStats()
    perms = weight_matching(
        spec,
        target.tensors,
        other.tensors,
        max_iter=params.max_iter,
        seed=state.loaded.recipe.seed,
        device=state.device,
        stats=matching,
        restarts=params.restarts,
    )
    if stats is not None:
        stats[other.name] = matching
    best = matching.objectives[matching.best_restart]
    state.log.info(
        f"weight matching {other.name} to {target.name}: objective {best:.6g} (restart "
        f"{matching.best_restart + 1} of {params.restarts}, {matching.sweeps} sweeps)",
        restart_objectives=[round(x, 6) for x in matching.objectives],
    )
    return perms


@step_method("align", "activation_matching", ActivationMatchingParams, needs=("model", "data.fit"))
def align_activation_matching(state: MergeState, params: ActivationMatchingParams) -> None:
    """Activation matching (Ainsworth et al., 2023): permutations from unit correlations."""
    align_models(
        state, params, "activation_matching", partial(activation_matching_transforms, state, params)
    )


def activation_matching_transforms(
    state: MergeState,
    params: ActivationMatchingParams,
    spec: PermutationSpec,
    target: Target,
    other: Checkpoint,
) -> Transforms:
    """Activation matching (Ainsworth et al., 2023) of ``other`` to ``target``."""
    stats = fit_statistics(state, spec, target, other, params.batches)
    perms = match_activations(stats, params.statistic, spec)
    return match_unread_heads(spec, perms, stats, target.tensors, other.tensors)


@step_method("align", "cca", CCAParams, needs=("model", "data.fit"))
def align_cca(state: MergeState, params: CCAParams) -> None:
    """CCA Merge (Horoi et al., 2024): linear maps from canonical correlation analysis."""
    spec = permutation_spec(state)
    fallback = permutation_only_groups(spec, state, "cca", params)
    warn_without_reset_bn(state, spec, fallback)
    reported: set[str] = set()
    align_models(
        state, params, "cca", partial(cca_transforms, state, params, reported), params.batchnorm
    )
    if params.batchnorm == "fold":
        _fold_reference(state, spec)


def cca_transforms(
    state: MergeState,
    params: CCAParams,
    reported: set[str] | None,
    spec: PermutationSpec,
    target: Target,
    other: Checkpoint,
) -> Transforms:
    """CCA Merge (Horoi et al., 2024) of ``other`` to ``target``; dead units are warned about
    once per model named in ``reported`` (every time when None)."""
    fallback = permutation_only_groups(spec)
    stats = fit_statistics(state, spec, target, other, params.batches)
    mapped = {n: s for n, s in stats.items() if n not in fallback}
    _warn_constant_units(state, mapped, target, other, set() if reported is None else reported)
    # Identity for groups without statistics; the mapped ones are replaced below.
    transforms = match_activations({n: s for n, s in stats.items() if n in fallback}, spec=spec)
    transforms = match_unread_heads(spec, transforms, stats, target.tensors, other.tensors)
    for name, s in mapped.items():
        transforms[name] = torch.stack(cca_transform(s, params.gamma)).cpu()
    return transforms


def permutation_only_groups(
    spec: PermutationSpec,
    state: MergeState | None = None,
    method: str = "",
    params: AlignParams | None = None,
) -> set[str]:
    """Groups through norms with statistics across units (LayerNorm, GroupNorm) or per-unit
    weights that no map can pass (PReLU, depthwise conv): they keep a permutation. With
    ``state``, the log says which, for ``method`` (not when the transforms come from a file)."""
    heads = spec.attention_of()  # heads move only as whole permutations
    groups = {
        g.name for g in spec.groups if g.name in heads or any(m.role == "norm" for m in g.members)
    }
    if state is not None and groups and params is not None and params.from_ is None:
        state.log.warn(
            f"{method}: {len(groups)} group(s) are attention heads or pass through LayerNorm, "
            "GroupNorm, PReLU or a depthwise conv, which only a permutation passes, and are "
            f"aligned by permutation (activation matching): {', '.join(sorted(groups))}"
        )
    return groups


# How each built-in method brings a checkpoint into another model's basis: the align step
# targets the reference, a pairwise fit's later stages the running merge.
TRANSFORMS: dict[str, Callable[..., Transforms]] = {
    "weight_matching": partial(weight_matching_transforms, stats=None),
    "activation_matching": activation_matching_transforms,
    "cca": partial(cca_transforms, reported=None),
}


def align_to(
    state: MergeState, step: StepSpec, target: Target, other: Checkpoint
) -> tuple[StateDict, StateDict] | None:
    """``target`` and ``other`` in one basis by the method and parameters of the recipe's align
    ``step``, applied as the step applies them: ``other`` mapped into ``target``'s basis (and
    with ``batchnorm: fold``, ``target`` folded alike, the same function). None when that step
    cannot be run against another target (it reused saved transforms, or its method is not a
    built-in)."""
    compute = TRANSFORMS.get(step.method)
    if compute is None or getattr(step.params, "from_", None):
        return None
    spec = permutation_spec(state)
    params = step.params
    transforms = compute(state, params, spec=spec, target=target, other=other)
    batchnorm = getattr(params, "batchnorm", "paper")
    aligned = apply_transforms(other.tensors, spec, transforms, batchnorm)
    if batchnorm != "fold":
        return target.tensors, aligned
    mapped = {name for name, t in transforms.items() if t.dim() > 1}
    return fold_norms(target.tensors, spec, mapped), aligned


def _fold_reference(state: MergeState, spec: PermutationSpec) -> None:
    """With ``batchnorm: fold`` the others are in the reference's folded basis: fold it too
    (the same function in eval mode), so that merges average like with like."""
    saved = state.artifacts[ALIGNMENT_FILE][0]
    mapped = {key.rpartition("/")[2] for key, t in saved.items() if t.dim() > 1}
    reference = state.reference
    reference.aligned = fold_norms(reference.tensors, spec, mapped)
    for checkpoint in state.models:
        if checkpoint is not reference and checkpoint.aligned is not None:
            distance = state.report["align"]["weight_distance"][checkpoint.name]
            distance["after"] = weight_distance(reference.aligned, checkpoint.aligned)


def warn_without_reset_bn(
    state: MergeState, spec: PermutationSpec, fallback: set[str], method: str = "cca"
) -> None:
    """Mapped BatchNorm running statistics are an estimate: say so unless a reset follows."""
    mapped = sorted(
        g.name
        for g in spec.groups
        if g.name not in fallback and any(m.tensor.endswith("running_var") for m in g.members)
    )
    later = state.steps_after()
    if mapped and not any(s.method == "reset_bn" or s.kind == "fit" for s in later):
        state.log.warn(
            f"{method}: {len(mapped)} group(s) pass through BatchNorm, whose running statistics "
            "are mapped as if the units were uncorrelated (an estimate) and no reset_bn follows; "
            "add `repair: {method: reset_bn}` after the merge to recompute them"
        )


def _warn_constant_units(
    state: MergeState,
    stats: dict[str, PairStatistics],
    target: Target,
    other: Checkpoint,
    reported: set[str],
) -> None:
    """One line per model: the groups with units that are constant on data.fit, and how many."""
    counts = {name: constant_units(s) for name, s in stats.items()}
    for index, model in enumerate((target.name, other.name)):
        found = [f"{name} {c[index]}" for name, c in counts.items() if c[index]]
        if found and model not in reported:
            reported.add(model)
            state.log.warn(
                f"cca: {model} has dead units (constant on data.fit) in {len(found)} group(s): "
                f"{', '.join(found)}; no data decides their map, so they are paired with the "
                "other model's uncorrelated units in unit order"
            )


def fit_statistics(
    state: MergeState,
    spec: PermutationSpec,
    target: Target,
    other: Checkpoint,
    limit: int | None,
):
    """Activation statistics over the first ``limit`` batches of data.fit. With several ranks,
    each takes its share of every batch and the sums are all-reduced: the same batches, hence
    the same statistics (and transforms) as one process, on every rank."""
    world = current_world()
    data = state.data("fit")
    part = (world.rank, world.size) if world.distributed else None
    batches = data.batches(state.batch_size("fit"), device=state.device, part=part)
    inputs = (x for i, (x, _) in enumerate(batches) if limit is None or i < limit)
    model = state.build_module()
    to_device = {k: v.to(state.device) for k, v in target.tensors.items()}
    other_tensors = {k: v.to(state.device) for k, v in other.tensors.items()}
    stats = pair_statistics(model, spec, to_device, other_tensors, inputs)
    if world.distributed:
        for s in stats.values():
            s.all_reduce_(world)
    check_finite(stats, (target.name, other.name))
    heads = spec.attention_of()
    unread = [g.name for g in spec.groups if g.name not in stats and g.name not in heads]
    if unread:
        state.log.warn(
            f"{len(unread)} group(s) have no submodule whose input or output shows their units, "
            f"so no activations to match; they keep their order: {', '.join(unread)}"
        )
    by_weights = [a.name for a in spec.attention if not all(n in stats for n in a.groups)]
    if by_weights:
        state.log.info(
            f"the heads of {len(by_weights)} attention layer(s) show no activations to hooks "
            f"(projections inside a module, as nn.MultiheadAttention's): matched by their "
            f"weights once the rest is aligned: {', '.join(by_weights)}"
        )
    return stats


def align_models(
    state: MergeState,
    params: AlignParams,
    method: str,
    compute: Callable[[PermutationSpec, Target, Checkpoint], Transforms],
    batchnorm: BatchNormMapping = "paper",
    reference_moves: bool = False,
) -> None:
    """Map every merged model but the reference (with ``reference_moves``, it too: a method
    whose basis is new, as ZipIt!'s) by ``compute``'s transforms or those saved in ``from``."""
    spec = permutation_spec(state)
    reference = state.reference
    saved = load_alignment(params.from_, spec) if params.from_ else None
    to_save: dict[str, torch.Tensor] = {}
    distances = {}
    for checkpoint in state.models:
        if checkpoint is reference and not reference_moves:
            continue
        if saved is not None:
            if checkpoint.name not in saved:
                raise MergeCliError(
                    f"align.from: {params.from_} has no transforms for '{checkpoint.name}' "
                    f"(it has: {', '.join(sorted(saved))}); name the checkpoint with `name:`"
                )
            transforms = saved[checkpoint.name]
        else:
            transforms = compute(spec, Target(reference.name, reference.tensors), checkpoint)
        checkpoint.aligned = apply_transforms(checkpoint.tensors, spec, transforms, batchnorm)
        for group, tensor in transforms.items():
            to_save[f"{checkpoint.name}/{group}"] = tensor.contiguous()
        if params.save_aligned:
            state.artifacts[f"aligned/{checkpoint.name}.safetensors"] = (
                checkpoint.aligned,
                {"format": "pt", **_model_metadata(state)},
            )
    for checkpoint in state.models:
        if checkpoint is reference:
            continue
        distances[checkpoint.name] = {
            "before": weight_distance(reference.tensors, checkpoint.tensors),
            "after": weight_distance(reference.aligned_or_original, checkpoint.aligned),
        }
        # Transforms read from a file were not computed here: the log says where they came from.
        how = f" with the transforms from {params.from_}" if saved is not None else ""
        state.log.info(
            f"aligned {checkpoint.name} to {reference.name}{how}",
            distance_before=round(distances[checkpoint.name]["before"], 3),
            distance_after=round(distances[checkpoint.name]["after"], 3),
        )
    state.artifacts[ALIGNMENT_FILE] = (
        to_save,
        {
            "mergecli.alignment": method,
            "mergecli.reference": reference.name,
            "mergecli.groups": json.dumps({g.name: g.size for g in spec.groups}),
        },
    )
    state.report["align"] = {
        "method": method,
        "reference": reference.name,
        "graph": spec.traced_with,
        "groups": [{"name": g.name, "size": g.size} for g in spec.groups],
        "attention": [
            {
                "name": a.name,
                "groups": list(a.groups),
                "heads": a.heads,
                "kv_heads": a.kv_heads,
                "qk_dims": a.qk_dims,
                "v_dims": a.v_dims,
                "qk_dims_fixed": a.qk_dims_fixed,
            }
            for a in spec.attention
        ],
        "warnings": list(spec.warnings),
        "weight_distance": distances,
        **({"from": params.from_} if saved is not None else {}),
    }


def weight_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 distance between two models' floating parameters (smaller after a good alignment)."""
    total = sum(
        float((a[n].double() - b[n].double()).pow(2).sum()) for n in a if a[n].is_floating_point()
    )
    return total**0.5


def _model_metadata(state: MergeState) -> dict[str, str]:
    """Saved aligned models name their architecture, as the merged model does."""
    spec = state.model_spec
    return {} if spec is None else model_metadata(spec.arch, spec.args)


def load_alignment(path: str, spec: PermutationSpec) -> dict[str, Transforms]:
    """Transforms saved by an earlier run, checked against this model's groups."""
    from mergecli.io import load_state_dict

    sizes = {g.name: g.size for g in spec.groups}
    by_model: dict[str, Transforms] = {}
    for key, tensor in load_state_dict(path).items():
        model, _, group = key.rpartition("/")
        if group not in sizes or tensor.dim() == 0 or tensor.shape[-1] != sizes[group]:
            raise MergeCliError(
                f"align.from: {path}: transform '{key}' does not fit this model's groups "
                f"({', '.join(f'{n}[{s}]' for n, s in sizes.items())}); was it saved for "
                "another architecture?"
            )
        if not _is_transform(tensor, sizes[group]):
            n = sizes[group]
            raise MergeCliError(
                f"align.from: {path}: transform '{key}' is neither a permutation of {n} units "
                f"nor a linear map stacked with its inverse (2, {n}, {n}); give the "
                f"{ALIGNMENT_FILE} of an earlier run"
            )
        by_model.setdefault(model, {})[group] = tensor
    for model, transforms in by_model.items():
        missing = sorted(set(sizes) - set(transforms))
        if missing:
            raise MergeCliError(
                f"align.from: {path}: no transform for group(s) {', '.join(missing)} of '{model}'"
            )
        for attention in spec.attention:
            if not is_head_permutation(attention, transforms):
                raise MergeCliError(
                    f"align.from: {path}: the transforms of '{model}' for "
                    f"{', '.join(attention.groups)} are not one permutation of the heads of "
                    f"{attention.name} (heads move q/k/v rows and output columns together); "
                    f"give the {ALIGNMENT_FILE} of an earlier run"
                )
    return by_model


def _is_transform(tensor: torch.Tensor, size: int) -> bool:
    """A permutation of ``size`` units (integers), or a finite linear map stacked with its
    inverse, as ``align`` saves them."""
    if tensor.dim() == 1:
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            return False
        return torch.equal(tensor.sort().values.long(), torch.arange(size))
    pair = tensor.shape == (2, size, size) and tensor.is_floating_point()
    return pair and bool(tensor.isfinite().all())
