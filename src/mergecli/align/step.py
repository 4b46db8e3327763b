"""The `align` step: bring every merged model into the reference's basis of hidden units."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Literal, NamedTuple

import torch
from pydantic import ConfigDict, Field

from mergecli.align.activation_matching import match_activations
from mergecli.align.activations import check_finite, pair_statistics
from mergecli.align.cca import cca_transform
from mergecli.align.groups import PermutationSpec
from mergecli.align.permute import check_spec
from mergecli.align.spec import derive_spec
from mergecli.align.tracing import trace
from mergecli.align.transform import Transforms, apply_transforms
from mergecli.align.weight_matching import MatchingStats, weight_matching
from mergecli.errors import MergeCliError
from mergecli.models.metadata import model_metadata
from mergecli.recipe.schema import StepParams, StepSpec
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


class ActivationMatchingParams(AlignParams):
    statistic: Literal["correlation", "cross_moment"] = "correlation"
    batches: int | None = Field(default=None, ge=1)


class CCAParams(AlignParams):
    gamma: float = Field(default=1.0, ge=0)
    batches: int | None = Field(default=None, ge=1)


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
    stats = MatchingStats()
    compute = partial(weight_matching_transforms, state, params, stats=stats)
    _align(state, params, "weight_matching", compute)
    state.report["align"]["sweeps"] = stats.sweeps
    state.report["align"]["lap_seconds"] = round(stats.lap_seconds, 4)


def weight_matching_transforms(
    state: MergeState,
    params: WeightMatchingParams,
    spec: PermutationSpec,
    target: Target,
    other: Checkpoint,
    stats: MatchingStats | None = None,
) -> Transforms:
    """Weight matching (Ainsworth et al., 2023) of ``other`` to ``target``."""
    return weight_matching(
        spec,
        target.tensors,
        other.tensors,
        max_iter=params.max_iter,
        seed=state.loaded.recipe.seed,
        device=state.device,
        stats=stats,
    )


@step_method("align", "activation_matching", ActivationMatchingParams, needs=("model", "data.fit"))
def align_activation_matching(state: MergeState, params: ActivationMatchingParams) -> None:
    """Activation matching (Ainsworth et al., 2023): permutations from unit correlations."""
    _align(
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
    stats = _statistics(state, spec, target, other, params.batches)
    return match_activations(stats, params.statistic)


@step_method("align", "cca", CCAParams, needs=("model", "data.fit"))
def align_cca(state: MergeState, params: CCAParams) -> None:
    """CCA Merge (Horoi et al., 2024): linear maps from canonical correlation analysis."""
    _align(state, params, "cca", partial(cca_transforms, state, params))


def cca_transforms(
    state: MergeState, params: CCAParams, spec: PermutationSpec, target: Target, other: Checkpoint
) -> Transforms:
    """CCA Merge (Horoi et al., 2024) of ``other`` to ``target``."""
    stats = _statistics(state, spec, target, other, params.batches)
    # Norm layers scale units one by one, which only a permutation preserves.
    with_norms = {g.name for g in spec.groups if any(m.role == "norm" for m in g.members)}
    transforms = match_activations({n: s for n, s in stats.items() if n in with_norms})
    for name, s in stats.items():
        if name not in with_norms:
            transforms[name] = torch.stack(cca_transform(s, params.gamma)).float().cpu()
    if with_norms:
        state.log.warn(
            f"cca: {len(with_norms)} group(s) pass through norm layers and are aligned by "
            f"permutation (activation matching): {', '.join(sorted(with_norms))}"
        )
    return transforms


# How each built-in method brings a checkpoint into another model's basis: the align step
# targets the reference, a pairwise fit's later stages the running merge.
TRANSFORMS: dict[str, Callable[..., Transforms]] = {
    "weight_matching": weight_matching_transforms,
    "activation_matching": activation_matching_transforms,
    "cca": cca_transforms,
}


def align_to(
    state: MergeState, step: StepSpec, target: Target, other: Checkpoint
) -> StateDict | None:
    """``other``'s tensors brought into ``target``'s basis by the method and parameters of the
    recipe's align ``step``, applied as the step applies them; None when that step cannot be
    run against another target (it reused saved transforms, or its method is not a built-in)."""
    compute = TRANSFORMS.get(step.method)
    if compute is None or getattr(step.params, "from_", None):
        return None
    spec = permutation_spec(state)
    return apply_transforms(other.tensors, spec, compute(state, step.params, spec, target, other))


def _statistics(
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
    graph_module = trace(state.build_module())
    to_device = {k: v.to(state.device) for k, v in target.tensors.items()}
    other_tensors = {k: v.to(state.device) for k, v in other.tensors.items()}
    stats = pair_statistics(graph_module, spec, to_device, other_tensors, inputs)
    if world.distributed:
        for s in stats.values():
            s.all_reduce_(world)
    check_finite(stats, (target.name, other.name))
    return stats


def _align(
    state: MergeState,
    params: AlignParams,
    method: str,
    compute: Callable[[PermutationSpec, Target, Checkpoint], Transforms],
) -> None:
    spec = permutation_spec(state)
    reference = state.reference
    saved = load_alignment(params.from_, spec) if params.from_ else None
    to_save: dict[str, torch.Tensor] = {}
    distances = {}
    for checkpoint in state.models:
        if checkpoint is reference:
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
        checkpoint.aligned = apply_transforms(checkpoint.tensors, spec, transforms)
        for group, tensor in transforms.items():
            to_save[f"{checkpoint.name}/{group}"] = tensor.contiguous()
        distances[checkpoint.name] = {
            "before": _distance(reference.tensors, checkpoint.tensors),
            "after": _distance(reference.tensors, checkpoint.aligned),
        }
        state.log.info(
            f"aligned {checkpoint.name} to {reference.name}",
            distance_before=round(distances[checkpoint.name]["before"], 3),
            distance_after=round(distances[checkpoint.name]["after"], 3),
        )
        if params.save_aligned:
            state.artifacts[f"aligned/{checkpoint.name}.safetensors"] = (
                checkpoint.aligned,
                {"format": "pt", **_model_metadata(state)},
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
        "groups": [{"name": g.name, "size": g.size} for g in spec.groups],
        "warnings": list(spec.warnings),
        "weight_distance": distances,
    }


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
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
