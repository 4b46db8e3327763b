"""The `fit` step: NP Merge learns a merge coefficient per parameter on a task loss; with a base
model, coefficients over the fine-tunes' task vectors, from a data-free merge (fit/start.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from torch import Tensor, nn

from mergecli.data import TensorData
from mergecli.errors import MergeCliError
from mergecli.evaluate.tokens import causal_lm_loss, next_token_losses
from mergecli.fit.coefficients import (
    FlatParameters,
    coefficient_values,
    joint_merge,
    logit,
    logits_per_model,
    merged_weights,
    pairwise_merge,
    task_vector_merge,
)
from mergecli.fit.loop import FitCheckpoint, FitConfig, FitProblem, fit_logits
from mergecli.fit.sharded import ShardedStack, lockstep_shares
from mergecli.fit.start import (
    DEFAULT_START,
    TaskVectors,
    apply_task_vectors,
    broadcastable,
    compact,
    start_merge,
    start_problems,
)
from mergecli.io.sizes import format_size
from mergecli.models.batchnorm import batch_norms
from mergecli.models.forward import TokenBatch, functional_logits, model_logits
from mergecli.recipe.schema import Recipe, StepParams, StepSpec, shown_default
from mergecli.registry import step_method
from mergecli.runtime.distributed import current as current_world
from mergecli.runtime.signals import STOP, STOP_SIGNALS
from mergecli.state import Checkpoint, MergeState, StateDict

COEFFICIENTS_FILE = "coefficients.safetensors"
# Pairwise stage k (1-based) starts the running merge of k models at weight k/(k+1).
INIT_DEFAULT = "k/(k+1) per stage (0.5 for two models)"


class FitParams(StepParams):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: str | None = Field(default=None, alias="from")
    init: float | None = Field(
        default=None, gt=0, lt=1, json_schema_extra=shown_default(INIT_DEFAULT)
    )
    multi: Literal["pairwise", "joint"] = "pairwise"
    granularity: Literal["parameter", "row", "tensor", "model"] = "parameter"
    loss: Literal["cross_entropy", "causal_lm", "distill", "entropy"] = "cross_entropy"
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(default=0.05, gt=0)
    epochs: int | None = Field(
        default=None, ge=1, json_schema_extra=shown_default("5 (unless steps is given)")
    )
    steps: int | None = Field(
        default=None, ge=1, json_schema_extra=shown_default("as many as the epochs take")
    )
    batch_size: int | None = Field(
        default=None, ge=1, json_schema_extra=shown_default("data.fit's batch_size")
    )
    fraction: float | None = Field(
        default=None, gt=0, le=1, json_schema_extra=shown_default("1 (all of data.fit)")
    )
    l2: float = Field(default=0.0, ge=0)
    seed: int | None = Field(default=None, json_schema_extra=shown_default("the recipe's seed"))
    compile: bool = False
    checkpoint_every: int = Field(default=200, ge=1)
    # With a `role: base` checkpoint: the data-free merge the fit over task vectors starts from.
    start: Literal["task_arithmetic", "ties", "average"] | None = Field(
        default=None,
        json_schema_extra=shown_default(f"{DEFAULT_START} when a checkpoint has role: base"),
    )
    # The start merge's own parameters, named as in its merge step: lambda, density, normalize.
    start_params: dict[str, Any] = Field(default_factory=dict)
    # Recompute activations in the backward pass instead of keeping them (less memory, ~1/3
    # more compute): per layer, by the model's own mechanism for Hugging Face models.
    checkpointing: bool = False
    # Hold the stacked models sharded over the job's processes (torchrun/srun) with PyTorch
    # FSDP instead of whole on every device: for models whose copies do not fit one device.
    shard: Literal["fsdp"] | None = Field(
        default=None, json_schema_extra=shown_default("none (each rank holds every copy)")
    )

    @model_validator(mode="after")
    def _epochs_or_steps(self) -> FitParams:
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give epochs or steps, not both")
        if self.epochs is None and self.steps is None:
            self.epochs = 5
        if self.init is not None and self.multi == "joint":
            raise ValueError("init applies to multi: pairwise (joint starts uniform)")
        if self.shard is not None and self.compile:
            raise ValueError("compile and shard: fsdp do not go together; drop one")
        return self

    def recipe_problems(self, recipe: Recipe) -> list[tuple[tuple[str | int, ...], str]]:
        has_base = any(c.role == "base" for c in recipe.checkpoints)
        if not has_base:
            given = [key for key in ("start", "start_params") if key in self.model_fields_set]
            return [
                ((given[0],), f"{given[0]} needs a base model: mark one checkpoint `role: base` "
                              "(without one, np_merge merges the models themselves)")
            ] if given else []  # fmt: skip
        problems = [
            ((key,), f"{key} applies to NP Merge without a base model; with `role: base` the "
                     "fit learns one coefficient per task vector, all models at once")
            for key in ("multi", "init")
            if key in self.model_fields_set
        ]  # fmt: skip
        return problems + start_problems(self.start or DEFAULT_START, self.start_params)

    def defaults_used(self, recipe: Recipe) -> dict[str, Any]:
        used: dict[str, Any] = {"seed": recipe.seed}
        if recipe.data.fit is not None:
            used["batch_size"] = recipe.data.fit.batch_size
        if any(c.role == "base" for c in recipe.checkpoints):
            return {**used, "start": self.start or DEFAULT_START}
        if self.multi == "pairwise" and _merged_count(recipe) == 2:
            used["init"] = 0.5
        return used

    def defaults_described(self, recipe: Recipe) -> dict[str, str]:
        described = super().defaults_described(recipe)
        if any(c.role == "base" for c in recipe.checkpoints):
            return {k: v for k, v in described.items() if k != "init"}
        described.pop("start", None)
        if self.multi == "joint":
            return {**described, "init": "joint starts uniform"}
        count = _merged_count(recipe)
        per_stage = ", ".join(f"{k / (k + 1):.3g}" for k in range(1, max(count, 2)))
        return {**described, "init": f"{INIT_DEFAULT}: {per_stage} for {count} models"}


def _merged_count(recipe: Recipe) -> int:
    """How many checkpoints the fit merges: all but the base."""
    return sum(c.role != "base" for c in recipe.checkpoints)


@step_method("fit", "np_merge", FitParams, needs=("model", "data.fit"), default=True)
def np_merge(state: MergeState, params: FitParams) -> None:
    """NP Merge (Orozco Camacho et al., 2024): per-parameter coefficients learned by gradient."""
    # Sharded, the module's own weights are replaced by the stacks' parametrizations: built in
    # host memory, they never take a whole model's room on the device.
    module = _fit_module(state) if params.shard else state.build_module()
    names = [n for n, p in module.named_parameters() if p.is_floating_point()]
    models = [state.reference] + [m for m in state.models if m is not state.reference]
    if state.base is not None and not models:
        raise MergeCliError("fit: np_merge needs at least one fine-tune besides the base")
    if state.base is None and len(models) < 2:
        raise MergeCliError("fit: np_merge needs at least two checkpoints to merge")
    if params.from_:
        merged = _apply_saved(state, params, models, names)
    elif state.base is not None:
        merged = _fit_task_vectors(state, params, module, models, names)
    else:
        _warn_if_unaligned(state, params)
        merged = _fit(state, params, module, models, names)
    # The parameters from the fit, the rest (BatchNorm statistics, reset below or by the
    # recipe's repair step) from the reference.
    reference = state.reference.tensors
    merged_names = set(names)
    state.merged = {n: merged[n] if n in merged_names else reference[n] for n in reference}
    _reset_batchnorm_if_needed(state, module)


def _fit(
    state: MergeState, params: FitParams, module: nn.Module, models: list, names: list[str]
) -> StateDict:
    """Fit each stage's coefficients, keep them for coefficients.safetensors, merge with them."""
    device = state.device
    seed, data, indexed, buffers = _prepare(state, params, module, names)
    if params.compile:
        module = torch.compile(module)
    loss_fn = _loss(params.loss, state, data, models, device)
    config = _config(state, params, seed)
    stages = _stages(params, models)
    saved: dict[str, Tensor] = {}
    report_stages = []

    def fit_stage(stage: int, sources: list[StateDict], init: float) -> StateDict:
        merge = joint_merge if params.multi == "joint" else pairwise_merge
        # A sharded module is parametrized by its stage's models: each stage needs its own.
        staged = module if stage == 0 or params.shard is None else _fit_module(state)
        flat, sharded = _stacked(state, params, staged, sources, names, merge, buffers, data)
        per_model = logits_per_model(params.granularity, flat)
        if params.multi == "joint":
            initial = torch.zeros(len(sources), per_model)
        else:
            initial = torch.full((per_model,), logit(init))
        validate = _validator(state, staged, flat, buffers, merge, params, sharded)
        checkpoint = _checkpoint(state, stage)
        name = f"fit stage {stage + 1}/{len(stages)}" if len(stages) > 1 else "fit"
        problem = FitProblem(
            staged, flat, buffers, merge, initial, indexed, loss_fn, device, validate, sharded
        )
        stage_name = f"stage {stage + 1}/{len(stages)} " if len(stages) > 1 else ""
        outcome = _run_fit(state, problem, config, checkpoint, name, stage_name)
        _stop_if_signalled(f"after fit stage {stage + 1}", checkpoint)
        values = coefficient_values(outcome.logits, params.multi)
        by_name = _coefficients_by_name(flat, values.cpu(), params, "")
        merged = _apply_coefficients(sources, by_name, params.multi, names)
        prefix = _stage_prefix(stage, len(stages))
        saved.update({f"{prefix}{n}": c for n, c in by_name.items()})
        report_stages.append(
            {
                "steps": outcome.steps,
                "seconds": round(outcome.seconds, 3),
                "history": outcome.history,
            }
        )
        state.log.info(
            f"{name}: {outcome.steps} steps in {outcome.seconds:.1f} s",
            mean_coefficient=round(float(values.float().mean()), 4),
        )
        return merged

    running, alignments = _run_stages(state, models, stages, params.multi, fit_stage)
    for record, alignment in zip(report_stages, alignments, strict=True):
        record["align"] = alignment
    metadata = {
        "mergecli.fit": "np_merge",
        "mergecli.multi": params.multi,
        "mergecli.granularity": params.granularity,
        "mergecli.models": json.dumps([m.name for m in models]),
    }
    state.artifacts[COEFFICIENTS_FILE] = (saved, metadata)
    state.report["fit"] = {
        "method": "np_merge",
        "multi": params.multi,
        "granularity": params.granularity,
        "loss": params.loss,
        "examples": len(data),
        "stages": report_stages,
        "seconds": round(sum(s["seconds"] for s in report_stages), 3),
        **_shard_report(params),
    }
    return running


def _prepare(state: MergeState, params: FitParams, module: nn.Module, names: list[str]):
    """What every fit needs: the seed, data.fit (indexed by example), the module in fit mode
    and the tensors that are not merged (from the reference)."""
    device = state.device
    seed = params.seed if params.seed is not None else state.loaded.recipe.seed
    data = _subset(state.data("fit"), params.fraction, seed)
    indexed = data.with_labels(torch.arange(len(data)))
    if device.type == "cuda":
        indexed = indexed.pin_memory()
    _set_fit_mode(module)
    buffers = {
        n: t.clone().to(device) for n, t in state.reference.tensors.items() if n not in names
    }
    return seed, data, indexed, buffers


def _config(state: MergeState, params: FitParams, seed: int) -> FitConfig:
    return FitConfig(
        granularity=params.granularity,
        optimizer=params.optimizer,
        lr=params.lr,
        epochs=params.epochs,
        steps=params.steps,
        batch_size=params.batch_size or state.batch_size("fit"),
        l2=params.l2,
        seed=seed,
        checkpoint_every=params.checkpoint_every,
        autocast=_autocast_dtype(state),
        checkpointing=params.checkpointing,
    )


def _run_fit(
    state: MergeState,
    problem: FitProblem,
    config: FitConfig,
    checkpoint: FitCheckpoint | None,
    name: str,
    stage_name: str = "",
):
    """``fit_logits``, stopped by a signal after the step it is in, with the state saved; a
    stop is never raised in the middle of a step or of a save."""
    with STOP.deferred():
        outcome = fit_logits(
            problem, config, state.log, checkpoint, should_stop=lambda _: STOP.pending(), name=name
        )
    if outcome.stopped_by is not None:
        per_epoch = math.ceil(len(problem.data) / config.batch_size)
        total = config.steps or per_epoch * config.epochs
        raise STOP.stopping(
            outcome.stopped_by,
            f"after fit {stage_name}step {outcome.steps}/{total} (epoch {outcome.epoch + 1})",
            checkpoint.path if checkpoint is not None else None,
        )
    return outcome


def _fit_task_vectors(
    state: MergeState, params: FitParams, module: nn.Module, models: list, names: list[str]
) -> StateDict:
    """Coefficients over task vectors (AdaMerging, Yang et al., 2024, at any granularity):
    c_i = c0_i + delta_i from the data-free merge named by `start` (delta = 0), kept only if
    they lower the fit loss below the start's on the same batches."""
    device = state.device
    seed, data, indexed, buffers = _prepare(state, params, module, names)
    _release_own_weights(module, names)
    base = state.base.tensors
    sources = [m.aligned_or_original for m in models]
    weights = torch.tensor(state.model_weights("fit", models))
    method = params.start or DEFAULT_START
    start = start_merge(method, params.start_params, base, sources, weights, names)
    stacked = [start.merged, *(TaskVectors(s, base) for s in sources)]
    flat, sharded = _stacked(
        state, params, module, stacked, names, task_vector_merge, buffers, data
    )
    config = _config(state, params, seed)
    initial = torch.zeros(len(models), logits_per_model(params.granularity, flat))
    loss_fn = _loss(params.loss, state, data, models, device)
    if params.compile:
        module = torch.compile(module)
    validate = _validator(state, module, flat, buffers, task_vector_merge, params, sharded)
    problem = FitProblem(
        module, flat, buffers, task_vector_merge, initial, indexed, loss_fn, device, validate,
        sharded,
    )  # fmt: skip
    checkpoint = _checkpoint(state, 0)
    outcome = _run_fit(state, problem, config, checkpoint, "fit")
    _stop_if_signalled("after the fit", checkpoint)
    deltas = _coefficients_by_name(flat, outcome.logits.cpu(), params, "")
    del flat, problem  # the stack: the output is computed from the checkpoints, in float32
    initial_c = {n: compact(start.coefficients[n]) for n in names}
    learned = {n: _plus(initial_c[n], deltas[n]) for n in names}
    ends = apply_task_vectors(base, sources, learned, names)
    starts = apply_task_vectors(base, sources, initial_c, names)
    if sharded is None:
        compare = _fit_loss_of(state, module, buffers, indexed, loss_fn, config)
        start_loss, end_loss = compare(starts), compare(ends)
    else:  # the sharded module computes its weights from coefficients: the start's are zero
        compare = _sharded_fit_loss(state, sharded, indexed, loss_fn, config)
        start_loss, end_loss = compare(torch.zeros_like(outcome.logits)), compare(outcome.logits)
    del sharded
    kept = "fit" if end_loss < start_loss else "start"
    state.log.info(
        f"fit: loss on data.fit {start_loss:.4f} at the start ({method}), {end_loss:.4f} after "
        f"{outcome.steps} steps in {outcome.seconds:.1f} s"
        + ("" if kept == "fit" else f"; keeping the start ({method}): the fit did not lower it"),
    )
    if kept == "start":
        state.log.warn(f"fit: the fit did not lower the fit loss; the output is the {method} start")
        learned, ends = initial_c, starts
    metadata = {
        "mergecli.fit": "np_merge",
        "mergecli.multi": "task_vectors",
        "mergecli.granularity": params.granularity,
        "mergecli.start": method,
        "mergecli.base": state.base.name,
        "mergecli.models": json.dumps([m.name for m in models]),
    }
    state.artifacts[COEFFICIENTS_FILE] = (learned, metadata)
    state.report["fit"] = {
        "method": "np_merge",
        "multi": "task_vectors",
        "granularity": params.granularity,
        "loss": params.loss,
        "examples": len(data),
        "start": {"method": method, "params": dict(params.start_params)},
        "fit_loss": {"start": start_loss, "end": end_loss},
        "kept": kept,
        "stages": [
            {
                "steps": outcome.steps,
                "seconds": round(outcome.seconds, 3),
                "history": outcome.history,
                "align": None,
            }
        ],  # fmt: skip
        "seconds": round(outcome.seconds, 3),
        **_shard_report(params),
    }
    return ends


def _shard_report(params: FitParams) -> dict[str, Any]:
    """How the stacked models were held, when sharded: the report's ``shard`` entry."""
    if params.shard is None:
        return {}
    return {"shard": {"method": params.shard, "ranks": current_world().size}}


def _stacked(
    state: MergeState,
    params: FitParams,
    module: nn.Module,
    sources: list,
    names: list[str],
    merge: Callable[[Tensor, Tensor], Tensor],
    buffers: dict[str, Tensor],
    data: TensorData,
) -> tuple[FlatParameters, ShardedStack | None]:
    """The models the fit merges, in the compute dtype: one (N, P) buffer on the device, or
    with `shard: fsdp` a stack per tensor inside the module, sharded over the ranks."""
    dtype = _compute_dtype(state)
    if params.shard is None:
        return FlatParameters.stack(sources, names, state.device, dtype), None
    if batch_norms(module):
        raise MergeCliError(
            "fit: shard: fsdp is for models without BatchNorm (their statistics are recomputed "
            "from whole merged weights); drop shard for this model"
        )
    world = current_world()
    if not world.distributed:
        state.log.info(
            "fit: shard: fsdp with one process holds every stack whole on its device; start "
            "several processes (torchrun or srun) to shard them"
        )
    sharded = ShardedStack(
        module, sources, names, params.granularity, merge, dtype, state.device, world, buffers
    )
    sharded.idle_on(data, state.device)
    held, total = sharded.stack_bytes()
    state.log.info(
        f"fit: the {len(sources)} stacked copies ({format_size(total)}) sharded over "
        f"{world.size} rank(s) with FSDP: {format_size(held)} on this one",
        every_rank=True,
    )
    return FlatParameters.layout(sources[0], names), sharded


def _fit_module(state: MergeState) -> nn.Module:
    """A module for a sharded fit, in host memory (its stacks and buffers go to the device)."""
    module = state.build_module(torch.device("cpu"))
    _set_fit_mode(module)
    return module


def _sharded_fit_loss(
    state: MergeState, sharded: ShardedStack, data: TensorData, loss_fn, config: FitConfig
) -> Callable[[Tensor], float]:
    """``_fit_loss_of`` through the sharded module, for coefficients (logits) rather than
    merged weights: every rank its share of each batch, the same batches on all of them."""
    world, device = current_world(), state.device
    autocast = config.autocast

    @torch.no_grad()
    def loss_of(logits: Tensor) -> float:
        total = torch.zeros(1, dtype=torch.float64, device=device)
        with sharded.using(logits.to(device)):
            for share in lockstep_shares(data, config.batch_size, world, device):
                with torch.autocast(device.type, autocast or torch.float32, enabled=bool(autocast)):
                    if share is None:
                        sharded.idle_loss()
                        continue
                    x, index = share
                    outputs = model_logits(sharded.module, x)
                total += loss_fn(outputs.float(), index).double() * len(index)
        return float(world.all_reduce_(total)) / len(data)

    return loss_of


def _release_own_weights(module: nn.Module, names: list[str]) -> None:
    """Free the module's own initial weights: every call of the fit gives it the merged ones
    (functional_call, or bound for checkpointing), so they would only take one more copy of
    the model on the device."""
    parameters = dict(module.named_parameters())
    for name in names:
        parameter = parameters[name]
        parameter.data = parameter.data.new_empty(0)


def _plus(c0: Tensor, delta: Tensor) -> Tensor:
    """c0 + delta, each (N, ...) as saved (per model, row or entry), in the finer shape."""
    dims = max(c0.dim(), delta.dim())
    return compact(broadcastable(c0, dims) + broadcastable(delta, dims))


def _fit_loss_of(state, module, buffers, data, loss_fn, config) -> Callable[[StateDict], float]:
    """The fit loss of merged weights: its mean over every example of data.fit, in order, in
    the fit's mode and precision (with several ranks, each its share, summed)."""
    world = current_world()
    start, end = world.part(len(data))
    shard = data.take(slice(start, end))
    autocast = config.autocast

    @torch.no_grad()
    def loss_of(merged: StateDict) -> float:
        weights = {**{n: t.to(state.device) for n, t in merged.items()}, **buffers}
        total = torch.zeros(1, dtype=torch.float64, device=state.device)
        for x, index in shard.batches(config.batch_size, device=state.device):
            with torch.autocast(
                state.device.type, autocast or torch.float32, enabled=bool(autocast)
            ):
                outputs = functional_logits(module, weights, x)
            total += loss_fn(outputs.float(), index).double() * len(index)
        return float(world.all_reduce_(total)) / len(data)

    return loss_of


# What one stage does with its sources (the running merge first, in a pairwise chain) and the
# running merge's initial weight: the merged parameters.
StageFn = Callable[[int, list[StateDict], float], StateDict]


def _run_stages(
    state: MergeState, models: list, stages: list[tuple[list, float]], multi: str, run: StageFn
) -> tuple[StateDict, list[dict | None]]:
    """The stage loop of fitting and of re-applying saved coefficients alike: pairwise, each
    stage merges the running merge with the next model aligned to it; joint, one stage.

    Returns the last running merge and how each stage's models were aligned (None: not at all).
    The running merge is a whole model: its parameters from the stage, its other tensors from
    the reference, and, when another model is to be aligned to it, its BatchNorm statistics
    recomputed on data.fit as the final model's will be (alignment compares its weights and
    activations with the next model's)."""
    align = next((s for s in reversed(state.steps_before()) if s.kind == "align"), None)
    first = {"method": align.method, "to": models[0].name} if align else None
    running = models[0].aligned_or_original
    alignments: list[dict | None] = []
    for stage, (members, init) in enumerate(stages):
        if stage == 0:  # the align step brought every model into the reference's basis
            sources = [running] + [m.aligned_or_original for m in members]
            alignments.append(first)
        else:
            # pairwise: one member, and with `batchnorm: fold` the running merge folded alike
            name = f"fit stage {stage + 1}/{len(stages)}"
            running, aligned, record = _aligned_to(state, align, running, members[0], name)
            sources = [running, aligned]
            alignments.append(record)
        running = {**running, **run(stage, sources, init)}
    return running, alignments


def _stage_prefix(stage: int, count: int) -> str:
    """How a stage's coefficients are named in coefficients.safetensors (none for one stage)."""
    return f"stage{stage + 1}/" if count > 1 else ""


def _stages(params: FitParams, models: list) -> list[tuple[list, float]]:
    """Pairwise: (the next model, the running merge's initial weight k/(k+1)); joint: one stage."""
    if params.multi == "joint" or len(models) == 2:
        return [(models[1:], params.init if params.init is not None else 0.5)]
    return [
        ([model], params.init if params.init is not None else k / (k + 1))
        for k, model in enumerate(models[1:], start=1)
    ]


def _aligned_to(
    state: MergeState,
    align: StepSpec | None,
    running: StateDict,
    checkpoint: Checkpoint,
    name: str = "fit",
) -> tuple[StateDict, StateDict, dict | None]:
    """In a pairwise chain each next model is aligned to the running merge (as in the paper), by
    the method and parameters of the recipe's align step; with no align step, not at all.
    Returns the running merge (folded with `batchnorm: fold`), the aligned model and how it
    was aligned, for the report."""
    from mergecli.align.step import Target, align_to

    if align is None:
        return running, checkpoint.aligned_or_original, None
    if getattr(align.params, "from_", None) is None:
        running = _with_batchnorm_statistics(state, running)
    pair = align_to(state, align, Target("the running merge", running), checkpoint)
    if pair is None:
        why = "reused from a file" if getattr(align.params, "from_", None) else "not a built-in"
        state.log.info(
            f"{name}: {checkpoint.name} keeps the align step's alignment to {state.reference.name} "
            f"(its transforms, {why}, cannot be recomputed against the running merge)"
        )
        record = {"method": align.method, "to": state.reference.name}
        return running, checkpoint.aligned_or_original, record
    state.log.info(f"{name}: aligned {checkpoint.name} to the running merge ({align.method})")
    target, aligned = pair
    return target, aligned, {"method": align.method, "to": "running merge"}


def _with_batchnorm_statistics(state: MergeState, weights: StateDict) -> StateDict:
    """``weights`` with their BatchNorm statistics recomputed on data.fit, over the batches the
    reset after the fit will use (unchanged when the model has no BatchNorm)."""
    from mergecli.repair.step import batchnorm_statistics

    module = state.build_module()
    if not batch_norms(module):
        return weights
    if state.loaded.recipe.data.fit is None:
        raise MergeCliError(
            "fit: the running merge of BatchNorm models needs its statistics recomputed on "
            "data.fit before the next model is aligned to it; add `data: {fit: {source: ...}}`"
        )
    _, batches = _final_reset(state, module)
    recomputed, _, _ = batchnorm_statistics(state, module, weights, batches, "fit: running merge")
    return recomputed


def _final_reset(state: MergeState, module: nn.Module) -> tuple[bool, int | None]:
    """Whether the BatchNorm statistics of the fit's result are recomputed after it (by the
    recipe's repair step, or by the reset_bn the fit runs when none follows), and over how
    many batches of data.fit (None: all)."""
    if not batch_norms(module):
        return False, None
    repair = next((s for s in state.steps_after() if s.kind == "repair"), None)
    if repair is None:
        return True, None  # _reset_batchnorm_if_needed: reset_bn with its defaults
    return repair.method == "reset_bn", getattr(repair.params, "batches", None)


def _coefficients_by_name(
    flat: FlatParameters, values: Tensor, params: FitParams, prefix: str
) -> dict[str, Tensor]:
    """The reference's weight (pairwise) or every model's weight (joint), named like parameters."""
    lead = values.shape[:-1]
    if params.granularity == "parameter":
        parts = values.split(flat.sizes, dim=-1)
        return {
            f"{prefix}{n}": p.reshape(*lead, *s).contiguous()
            for n, p, s in zip(flat.names, parts, flat.shapes, strict=True)
        }
    if params.granularity == "row":  # (rows,) or (N, rows): broadcast over the trailing axes
        parts = values.split(flat.rows, dim=-1)
        return {f"{prefix}{n}": p.contiguous() for n, p in zip(flat.names, parts, strict=True)}
    column = (
        (lambda i: values[..., i]) if params.granularity == "tensor" else (lambda i: values[..., 0])
    )
    return {f"{prefix}{n}": column(i).contiguous() for i, n in enumerate(flat.names)}


def _apply_coefficients(
    sources: list[StateDict], coefficients: dict[str, Tensor], multi: str, names: list[str]
) -> StateDict:
    """Merged tensors from coefficient values by name, in float32 from the sources themselves
    (not the fit's stack, which may be bf16): the fit's output and what `fit.from` re-applies,
    one function so that a re-applied file gives the same bits. Joint: sum_i c_i theta_i;
    pairwise: c theta_ref + (1 - c) theta_other (lerp: 0 and 1 are exact)."""
    merged = {}
    for name in names:
        stack = torch.stack([s[name].float() for s in sources])
        if multi == "joint":
            c = broadcastable(coefficients[name].float(), stack.dim())
            merged[name] = (c * stack).sum(0)
        else:
            c = broadcastable(coefficients[name].float()[None], stack.dim())[0]
            merged[name] = torch.lerp(stack[1], stack[0], c)
    return merged


def _apply_saved(state: MergeState, params: FitParams, models: list, names: list[str]) -> StateDict:
    """Re-apply coefficients from an earlier run's coefficients.safetensors without fitting."""
    from mergecli.io import load_state_dict, read_metadata

    saved = load_state_dict(params.from_)
    metadata = read_metadata(params.from_)
    multi = metadata.get("mergecli.multi", params.multi)

    def coefficients(prefix: str) -> dict[str, Tensor]:
        lacking = [f"{prefix}{n}" for n in names if f"{prefix}{n}" not in saved]
        if lacking:
            raise MergeCliError(
                f"fit.from: {params.from_} has no coefficients for '{lacking[0]}'; was it saved "
                "for another model or number of checkpoints?"
            )
        return {n: saved[f"{prefix}{n}"] for n in names}

    if multi == "task_vectors":
        if state.base is None:
            raise MergeCliError(
                f"fit.from: {params.from_} holds coefficients over task vectors; the recipe "
                "needs the same base model (`role: base`)"
            )
        sources = [m.aligned_or_original for m in models]
        merged = apply_task_vectors(state.base.tensors, sources, coefficients(""), names)
        state.log.info(f"fit: applied coefficients from {params.from_}")
        return merged
    stages = _stages(params.model_copy(update={"multi": multi}), models)

    def apply_stage(stage: int, sources: list[StateDict], _: float) -> StateDict:
        values = coefficients(_stage_prefix(stage, len(stages)))
        return _apply_coefficients(sources, values, multi, names)

    running, _ = _run_stages(state, models, stages, multi, apply_stage)
    state.log.info(f"fit: applied coefficients from {params.from_}")
    return running


def _loss(kind: str, state: MergeState, data: TensorData, models: list, device: torch.device):
    """The task loss over example indices: labels, the next tokens, the models' mean
    prediction, or none. Logits (N, L, V) of a language model are scored per token."""
    mask = data.mask.to(device) if data.mask is not None else None
    if kind == "cross_entropy":
        labels = data.y.to(device)
        return lambda outputs, index: F.cross_entropy(outputs, labels[index])
    if kind == "causal_lm":
        if data.x.is_floating_point():
            raise MergeCliError(
                "fit: loss causal_lm predicts the next token of token ids, and data.fit holds "
                "real-valued inputs; use `source: text` (or integer ids) or another loss"
            )
        ids = data.x.to(device)  # the fit's token ids: N x L x 8 bytes

        def causal_lm(outputs: Tensor, index: Tensor) -> Tensor:
            if outputs.dim() != 3:
                raise MergeCliError(
                    f"fit: loss causal_lm needs per-token logits (N, L, V) from a language "
                    f"model; the model gives shape {tuple(outputs.shape)}"
                )
            return causal_lm_loss(outputs, ids[index], None if mask is None else mask[index])

        return causal_lm
    if kind == "distill":
        teacher = _mean_softmax(state, data, models).to(device)

        def distill(outputs: Tensor, index: Tensor) -> Tensor:
            rows, keep = _per_position(outputs, mask, index)
            target = teacher[index].reshape(rows.shape)
            kl = F.kl_div(F.log_softmax(rows, dim=-1), target, reduction="none").sum(dim=-1)
            return _mean(kl, keep)

        return distill

    def entropy(outputs: Tensor, index: Tensor) -> Tensor:
        rows, keep = _per_position(outputs, mask, index)
        log_p = F.log_softmax(rows, dim=-1)
        return _mean(-(log_p.exp() * log_p).sum(dim=-1), keep)

    return entropy


def _per_position(
    outputs: Tensor, mask: Tensor | None, index: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Logits as rows of one distribution each: (N, C) as they are; a language model's
    (N, L, V) flattened to (N·L, V), with the mask of the real tokens (None: all count)."""
    if outputs.dim() != 3:
        return outputs, None
    keep = mask[index].reshape(-1) if mask is not None else None
    return outputs.reshape(-1, outputs.shape[-1]), keep


def _mean(values: Tensor, keep: Tensor | None) -> Tensor:
    """The mean of ``values`` over the rows ``keep`` marks (all of them without a mask)."""
    if keep is None:
        return values.mean()
    keep = keep.to(values.dtype)
    return (values * keep).sum() / keep.sum().clamp_min(1)


@torch.no_grad()
def _mean_softmax(state: MergeState, data: TensorData, models: list) -> Tensor:
    """The input models' mean predicted distribution on every fit example (the teacher): (N, C)
    for a classifier; (N, L, V) per token for a language model, N·L·V·4 bytes (60k tokens of
    a 32k vocabulary: 7.7 GB), so distill a language model on a small data.fit."""
    module = state.build_module().eval()
    total = None
    for checkpoint in models:
        module.load_state_dict(checkpoint.tensors)
        probs = torch.cat(
            [
                F.softmax(model_logits(module, x).float(), dim=-1).cpu()
                for x, _ in data.batches(state.batch_size("fit"), device=state.device)
            ]
        )
        total = probs if total is None else total + probs
    return total / len(models)


def _validator(state, module, flat, buffers, merge, params, sharded=None):
    """Validation on data.eval after each epoch, when the recipe has it, of the merged model as
    it will be used: in eval mode, with the BatchNorm statistics it will have (recomputed on
    data.fit as the reset after the fit will, when one follows). Loss and accuracy for a
    classifier; for a language model (per-token logits) the mean next-token cross-entropy and
    perplexity. With several named eval sets, each set's (keys ``val_<set>_loss``, ...).

    With several ranks each evaluates its share of every set and the sums are all-reduced; a
    sharded module (``sharded``) is run by every rank on its share of each batch instead."""
    from mergecli.models import load_into_model
    from mergecli.repair.step import batchnorm_statistics

    if state.loaded.recipe.data.eval is None:
        return None
    world = current_world()
    sets = state.eval_sets()
    shards = {}
    for name, data in sets.items():
        start, end = world.part(len(data)) if sharded is None else (0, len(data))
        shards[name] = (data.take(slice(start, end)), len(data), state.eval_batch_size(name))
    prefix = (lambda _: "val_") if len(sets) == 1 else (lambda name: f"val_{name}_")
    index = flat.group_index(params.granularity)
    # The fit runs BatchNorm in train mode, so a model with BatchNorm is validated on a module
    # of its own in eval mode; any other on the fit's module, in eval mode already.
    resets, batches = _final_reset(state, module)
    evaluated = state.build_module() if batch_norms(module) else None

    def batches_of(shard: TensorData, batch_size: int):
        if sharded is None:
            return shard.batches(batch_size, device=state.device)
        return lockstep_shares(shard, batch_size, world, state.device)

    @torch.no_grad()
    def validate(logits: Tensor) -> dict[str, float]:
        if sharded is not None:
            with sharded.using(logits):
                return run(None)
        merged = merged_weights(flat, merge, logits, params.granularity, index)
        return run({**merged, **buffers})

    def run(weights: StateDict | None) -> dict[str, float]:
        if evaluated is not None:
            if resets:
                batchnorm_statistics(state, evaluated, weights, batches, "fit: validated model")
            else:
                load_into_model(evaluated, weights, "fit: validated model")
            evaluated.eval()
        record = {}
        for name, (shard, examples, batch_size) in shards.items():
            # loss; correct examples (or predicted tokens); batches of per-token logits
            sums = torch.zeros(3, dtype=torch.float64, device=state.device)
            for batch in batches_of(shard, batch_size):
                if batch is None:  # an empty share of a batch, which a sharded module needs
                    sharded.idle_loss()
                    continue
                x, y = batch
                if weights is None:
                    outputs = model_logits(module, x).float()
                elif evaluated is None:
                    outputs = functional_logits(module, weights, x).float()
                else:
                    outputs = model_logits(evaluated, x).float()
                if outputs.dim() == 3:
                    ids, mask = (x.ids, x.mask) if isinstance(x, TokenBatch) else (x, None)
                    total, count = next_token_losses(outputs, ids, mask)
                    sums[0] += total
                    sums[1] += count
                    sums[2] += 1
                else:
                    sums[0] += F.cross_entropy(outputs, y, reduction="sum")
                    sums[1] += (outputs.argmax(1) == y).sum()
            loss, second, per_token = world.all_reduce_(sums).tolist()
            if per_token:
                mean = loss / max(second, 1)
                record[prefix(name) + "loss"] = mean
                record[prefix(name) + "perplexity"] = math.exp(min(mean, 700.0))
            else:
                record[prefix(name) + "loss"] = loss / examples
                record[prefix(name) + "accuracy"] = second / examples
        return record

    return validate


def _stop_if_signalled(detail: str, checkpoint: FitCheckpoint | None) -> None:
    """A signal that came during the fit's last save or validation: stop before going on.
    Ranks decide together, since one rank going on alone would wait for the others forever."""
    pending = STOP.pending()
    flags = torch.zeros(len(STOP_SIGNALS), dtype=torch.float64)
    if pending is not None:
        flags[STOP_SIGNALS.index(pending)] = 1
    flags = current_world().all_reduce_(flags)
    signalled = [s for s, n in zip(STOP_SIGNALS, flags.tolist(), strict=True) if n]
    if signalled:
        saved = checkpoint.path if checkpoint is not None else None
        raise STOP.stopping(signalled[0], detail, saved)


def _set_fit_mode(module: nn.Module) -> None:
    """BatchNorm uses batch statistics while fitting; everything else (dropout) is off."""
    module.eval()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()


def _reset_batchnorm_if_needed(state: MergeState, module: nn.Module) -> None:
    """BN statistics of a merged model describe neither input: recompute them unless told how."""
    from mergecli.repair.step import ResetBNParams, reset_bn

    if not batch_norms(module):
        return
    if any(s.kind == "repair" for s in state.steps_after()):
        return
    state.log.info("fit: the model has BatchNorm and no repair step follows: running reset_bn")
    reset_bn(state, ResetBNParams())


def _subset(data: TensorData, fraction: float | None, seed: int) -> TensorData:
    if fraction is None:
        return data
    count = max(1, round(fraction * len(data)))
    chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
    chosen = chosen.sort().values
    return data.take(chosen)


def _compute_dtype(state: MergeState) -> torch.dtype:
    """The dtype the stacked models are held in: bf16 where the forward runs in bf16 (CUDA
    with precision auto or bf16), float32 otherwise. Coefficients and Adam stay float32."""
    return _autocast_dtype(state, warn=False) or torch.float32


def _autocast_dtype(state: MergeState, warn: bool = True) -> torch.dtype | None:
    precision = state.loaded.recipe.precision
    if precision == "fp32" or state.device.type != "cuda":
        if precision == "bf16" and state.device.type != "cuda" and warn:
            state.log.warn("precision: bf16 autocast is only used on CUDA; fitting in float32")
        return None
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _checkpoint(state: MergeState, stage: int) -> FitCheckpoint | None:
    if not state.resume_dir:
        return None
    # Each fit step of the recipe keeps its own state: a second fit never resumes the first's.
    index = state.step.index
    fingerprint = state.loaded.sha256() + "".join(c.sha256 for c in state.checkpoints)
    path = state.resume_dir / f"step{index}-fit-stage{stage + 1}.safetensors"
    legacy = state.resume_dir / f"fit-stage{stage + 1}.pt"
    return FitCheckpoint(path, f"{fingerprint}:{index}:{stage}", legacy)


def _warn_if_unaligned(state: MergeState, params: FitParams) -> None:
    aligned = any(s.kind == "align" for s in state.steps_before())
    seeds = {c.metadata.get("mergecli.seed") for c in state.models}
    if not aligned and state.base is None and (len(seeds) > 1 or None in seeds):
        state.log.warn(
            "fit: the models were not aligned; models trained from different initialisations "
            "merge far better after an `align` step (alignment recommended)"
        )
