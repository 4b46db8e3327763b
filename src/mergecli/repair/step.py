"""The `repair` step: fix the activation statistics that merging shrinks or shifts.

Averaging the weights of two networks (even aligned ones) lowers the variance of hidden
activations ("variance collapse"), which compounds with depth. Two repairs:

- ``reset_bn``: networks with BatchNorm recompute the running statistics of the merged model
  over ``data.fit`` (the usual fix after weight averaging, e.g. in Git Re-Basin).
- ``repair``: networks without BatchNorm get REPAIR (Jordan et al., 2022): every layer's
  per-channel output mean and std are set to the interpolation of the endpoints' statistics,
  and the correction is folded into the layer's weight and bias; the output layer (the logits)
  too unless ``include_head: false``, as in the paper's notebooks.

The math lives in plain functions over modules and input batches; the step wrappers only load
state dicts and data and write the results back.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch
from pydantic import Field
from torch import Tensor, nn

from mergecli.errors import MergeCliError
from mergecli.models.batchnorm import batch_norms, batchnorm_buffers, reset_batchnorm_stats
from mergecli.recipe.schema import StepParams, shown_default
from mergecli.registry import step_method
from mergecli.repair.repair import head_layer, repair
from mergecli.state import MergeState, StateDict


def _inputs(state: MergeState, batches: int | None) -> Callable[[], Iterator[Tensor]]:
    """The first ``batches`` batches of data.fit (all when None), unshuffled, on the device."""
    data = state.data("fit")
    batch_size = state.batch_size("fit")

    def inputs() -> Iterator[Tensor]:
        stream = (x for x, _ in data.batches(batch_size, shuffle=False, device=state.device))
        return itertools.islice(stream, batches)

    return inputs


def _merged(state: MergeState, method: str) -> StateDict:
    if state.merged is None:
        raise MergeCliError(
            f"repair {method}: there is no merged model yet; put a `merge` (or `fit`) step "
            "before the `repair` step"
        )
    return state.merged


def _no_batchnorm_error() -> MergeCliError:
    return MergeCliError(
        "repair reset_bn: the model has no BatchNorm layers; use `repair: {method: repair}` "
        "for networks without BN, or drop the step"
    )


class ResetBNParams(StepParams):
    batches: int | None = Field(
        default=None, ge=1, json_schema_extra=shown_default("all of data.fit")
    )


@step_method("repair", "reset_bn", ResetBNParams, needs=("model", "data.fit"))
def reset_bn(state: MergeState, params: ResetBNParams) -> None:
    """Reset BN statistics on data.fit (Jordan et al., 2022; Ainsworth et al., 2023)."""
    merged = _merged(state, "reset_bn")
    module = state.build_module()
    if not batch_norms(module):
        raise _no_batchnorm_error()
    state.merged, layers, used = batchnorm_statistics(
        state, module, merged, params.batches, "repair reset_bn: merged model"
    )
    state.log.info(f"repair reset_bn: recomputed {layers} BatchNorm layers over {used} batches")
    state.report["repair"] = {"method": "reset_bn", "layers": layers, "batches": used}


def batchnorm_statistics(
    state: MergeState, module: nn.Module, weights: StateDict, batches: int | None, source: str
) -> tuple[StateDict, int, int]:
    """``weights`` with every BatchNorm's running statistics recomputed over the first
    ``batches`` batches of data.fit (all when None), with the layers and batches used; what
    reset_bn does. ``module`` is left holding them, in eval mode."""
    from mergecli.models import load_into_model

    load_into_model(module, weights, source)
    layers, used = reset_batchnorm_stats(module, _inputs(state, batches)())
    updated = dict(weights)
    for key, value in batchnorm_buffers(module).items():
        # Keep the checkpoint's dtypes (e.g. bf16 statistics stay bf16).
        updated[key] = value.to(weights[key].dtype) if key in weights else value
    return updated, layers, used


class RepairParams(StepParams):
    batches: int | None = Field(default=10, ge=1)
    eps: float = Field(default=1e-5, ge=0)
    # Correct the output layer (the logits) too, as the REPAIR notebooks do; false leaves it
    # as merged.
    include_head: bool = True


@step_method("repair", "repair", RepairParams, needs=("model", "data.fit"))
def repair_step(state: MergeState, params: RepairParams) -> None:
    """REPAIR (Jordan et al., 2022): interpolate the endpoints' channel statistics, no-BN nets."""
    merged = _merged(state, "repair")
    module = state.build_module()
    if batch_norms(module):
        raise MergeCliError(
            "repair: the model has BatchNorm layers, whose statistics REPAIR would "
            "fight; use `repair: {method: reset_bn}` instead"
        )
    inputs = _inputs(state, params.batches)
    available = -(-len(state.data("fit")) // state.batch_size("fit"))
    used = available if params.batches is None else min(params.batches, available)
    weights = torch.tensor(state.model_weights("repair"), dtype=torch.float64)
    endpoints = [m.aligned_or_original for m in state.models]
    head = head_layer(module)
    result = repair(module, merged, endpoints, weights, inputs, params.eps, params.include_head)
    state.merged = result.state_dict
    if result.scale_only:
        state.log.warn(
            f"repair: {len(result.scale_only)} layers have no bias ({result.scale_only[0]}, ...); "
            "only their std was corrected, not their mean"
        )
    for name, why in result.skipped.items():
        state.log.warn(f"repair: left layer '{name}' as it is: {why}")
    layers = len(result.repaired) + len(result.scale_only)
    corrected = [*result.repaired, *result.scale_only]
    head_done = head is not None and head in corrected
    which = f"the output layer '{head}' too" if head_done else "not the output layer"
    state.log.info(f"repair: corrected {layers} layers over {used} batches ({which})")
    state.report["repair"] = {
        "method": "repair",
        "layers": layers,
        "batches": used,
        "include_head": params.include_head,
        "head": head,
        "head_corrected": head_done,
    }
