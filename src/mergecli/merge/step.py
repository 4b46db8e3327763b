"""The `merge` step: apply a tensor-level merge method to every tensor of the checkpoints."""

from __future__ import annotations

import hashlib
import inspect
import typing
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any, Literal

import torch
from pydantic import Field, create_model
from pydantic.fields import FieldInfo
from torch import Tensor

from mergecli.errors import MergeCliError
from mergecli.io.lazy import LazyTensors, tensor_dtype, tensor_shape
from mergecli.merge.parameters import NO_MATCH, count_layers, tensor_values, tensor_weights, varying
from mergecli.merge.workspace import Workspace
from mergecli.recipe.schema import Recipe, StepParams
from mergecli.registry import mark_registered, step_method
from mergecli.runtime.device import one_core_spared, one_thread
from mergecli.state import Checkpoint, MergeState, StateDict

# Leading parameters of a merge function that the engine supplies; the rest are recipe keys.
TENSOR_ARGUMENTS = ("models", "weights", "base", "generator")

MergeFunction = Callable[..., Tensor]
# A method's rule on how many checkpoints it merges: (models besides the base, whether the
# recipe has a base) -> what is wrong, as one line, or None. Checked when the recipe is validated.
ModelCount = Callable[[int, bool], str | None]
COMPUTE_DTYPES = {
    "float32": torch.float32, "float64": torch.float64,
    "bfloat16": torch.bfloat16, "float16": torch.float16,
}  # fmt: skip


class MergeOptions(StepParams):
    """Keys every merge method takes besides its own."""

    # Inputs are converted to this dtype per tensor; the output dtype is `output.dtype`.
    compute_dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    # A tensor that some models lack: an error, or the base model's tensor unchanged.
    missing: Literal["error", "copy_from_base"] = "error"


def merge_method(
    name: str,
    needs_base: bool = False,
    per_model: tuple[str, ...] = (),
    model_count: ModelCount | None = None,
) -> Callable[[MergeFunction], MergeFunction]:
    """Register a function over one tensor's stack ``models`` (N, ...) as ``merge: {method: name}``.

    ``models`` is a fresh float32 stack per call, which the function may overwrite to save
    memory. The function's keyword parameters after ``models``, ``weights`` and ``base`` become the
    method's recipe parameters, with their type hints and defaults (``Annotated[float,
    Field(...)]`` adds bounds or an alias). A function that takes ``generator`` gets one seeded
    by the recipe's seed and the tensor's name, so results do not depend on processing order.
    Parameters named in ``per_model`` may be set per checkpoint (`checkpoints[].parameters`);
    when any checkpoint does, the function receives a list with one value per model.
    ``model_count`` (see ``ModelCount``) makes a wrong number of checkpoints a recipe error,
    found by `validate` before anything runs.

    A function may carry a ``streamed`` form (``fn.streamed``), which the engine calls instead
    on the CPU: ``streamed(models, weights, base, out, compute_dtype, **parameters)`` gets the
    inputs as stored (a list, in their own dtype, in buffers reused from tensor to tensor),
    writes the merged tensor into ``out`` (the output's dtype) and returns it, or returns None
    to have the stack form run. A NaN or inf in any input must reach its output: the engine
    checks the inputs only when the output is not finite (to blame the right file). It exists
    for cheap methods whose whole-tensor passes over float32 copies cost more than their
    arithmetic.
    """

    def register(fn: MergeFunction) -> MergeFunction:
        params = _params_model(name, fn, model_count)

        def run(state: MergeState, options: StepParams) -> None:
            # The validated values themselves, not a dump: a filter entry dumped to a dict
            # would no longer be told apart from a gradient.
            fields = type(options).model_fields
            values = {k: getattr(options, k) for k in fields if k not in MergeOptions.model_fields}
            defaults = {k: fields[k].default for k in values if not fields[k].is_required()}
            dtype = COMPUTE_DTYPES[options.compute_dtype]
            own = _per_model_settings(state, params, per_model)
            stream = merge_tensors(
                state, fn, values, needs_base, compute_dtype=dtype, own=own, defaults=defaults
            )
            state.merged = stream if state.streaming else dict(stream)

        run.__doc__ = fn.__doc__
        needs = ("base",) if needs_base else ()
        step_method("merge", name, params, needs=needs, per_model=per_model)(run)
        mark_registered(fn, "merge", name)
        return fn

    return register


def _params_model(
    name: str, fn: MergeFunction, model_count: ModelCount | None = None
) -> type[StepParams]:
    hints = typing.get_type_hints(fn, include_extras=True)
    fields: dict[str, Any] = {}
    for parameter in inspect.signature(fn).parameters.values():
        if parameter.name in TENSOR_ARGUMENTS:
            continue
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        annotation, alias = _split_alias(hints.get(parameter.name, Any))
        field = Field(default, alias=alias) if alias else default
        fields[parameter.name] = (varying(f"{name}_{parameter.name}", annotation), field)
    return create_model(f"{name}_params", __base__=_counted_options(name, model_count), **fields)


def _counted_options(name: str, model_count: ModelCount | None) -> type[MergeOptions]:
    """MergeOptions whose recipe check counts the checkpoints: every method needs one besides
    the base, and ``model_count`` says what else the method needs."""

    class CountedOptions(MergeOptions):
        def recipe_problems(self, recipe: Recipe) -> list[tuple[tuple[str | int, ...], str]]:
            has_base = any(c.role == "base" for c in recipe.checkpoints)
            models = sum(c.role != "base" for c in recipe.checkpoints)
            if models == 0:
                problem = (f"merge {name}: there is no checkpoint to merge besides the base "
                           "(`role: base`); add the checkpoints to merge")  # fmt: skip
            else:
                problem = model_count(models, has_base) if model_count else None
            return [*super().recipe_problems(recipe), *([((), problem)] if problem else [])]

    return CountedOptions


def _split_alias(annotation: Any) -> tuple[Any, str | None]:
    """``Annotated[T, Field(alias=...)]`` -> (T, alias): an alias belongs to the field, not to
    each form of the varying value."""
    if typing.get_origin(annotation) is not typing.Annotated:
        return annotation, None
    base, *metadata = typing.get_args(annotation)
    aliases = [m.alias for m in metadata if isinstance(m, FieldInfo) and m.alias]
    rest = [m for m in metadata if not (isinstance(m, FieldInfo) and m.alias)]
    annotation = typing.Annotated[(base, *rest)] if rest else base
    return annotation, aliases[0] if aliases else None


def merge_state_dicts(
    state: MergeState,
    fn: MergeFunction,
    options: dict[str, Any],
    needs_base: bool,
    aligned: bool = True,
) -> StateDict:
    """Merge every tensor into a state dict (see ``merge_tensors``)."""
    return dict(merge_tensors(state, fn, options, needs_base, aligned))


def merge_tensors(
    state: MergeState,
    fn: MergeFunction,
    options: dict[str, Any],
    needs_base: bool,
    aligned: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    own: dict[str, list[Any]] | None = None,
    defaults: dict[str, Any] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Merge tensor by tensor in ``compute_dtype``; non-floating tensors come from the reference.

    Returns an iterator of (name, merged tensor), one at a time, so a streaming writer holds one
    tensor's inputs. ``aligned`` merges the aligned tensors when an align step ran (False: the
    originals). ``options`` may vary by tensor (see `merge.parameters`); where a list of
    filters matches no tensor, the checkpoint's own setting (``own``), the step's, then
    ``defaults`` apply. Every tensor's values are worked out here, before the first tensor is
    merged, so a recipe that leaves one without a value fails before any work (and, streaming,
    before anything is written).
    """
    if not state.models:
        raise MergeCliError(
            f"{state.loaded.source}: there is no checkpoint to merge besides the base"
        )
    reference = state.layout
    names = list(reference)
    merged = [
        n
        for n in names
        if tensor_dtype(reference, n).is_floating_point and n not in state.copied_from_base
    ]
    layers = count_layers(names)
    table = tensor_values(merged, layers, options, defaults or {}, own or {})
    weights = tensor_weights(merged, layers, {m.index: m.spec.weight for m in state.models})
    return _merge_each(state, fn, table, weights, needs_base, aligned, compute_dtype)


def _merge_each(
    state: MergeState,
    fn: MergeFunction,
    table: dict[str, dict[str, Any]],
    weights_of: dict[str, list[float]],
    needs_base: bool,
    aligned: bool,
    compute_dtype: torch.dtype,
) -> Iterator[tuple[str, Tensor]]:
    """Merge the tensors in ``table`` with their parameter values and the models' weights
    there; the others come as they are from the reference."""
    models = state.models
    sources = [m.aligned_or_original if aligned else m.tensors for m in models]
    made: dict[tuple[float, ...], Tensor] = {}  # one tensor per distinct set of weights
    takes_generator = "generator" in inspect.signature(fn).parameters
    takes_base = "base" in inspect.signature(fn).parameters
    reference = state.layout
    names = list(reference)
    workspace = Workspace(state.device)
    cpu = state.device.type == "cpu"
    streamed = getattr(fn, "streamed", None) if cpu else None
    # A streamed form's threads take its pieces in turn, each on one intra-op thread: as many
    # as the intra-op threads `one_core_spared` leaves (on 2 cores, a second one ran no faster).
    workers = max(1, torch.get_num_threads() - 1)
    # Streaming, the inputs are hashed and the output written by threads of their own.
    with one_core_spared() if state.streaming and cpu else nullcontext():
        for name in state.log.progress(names, len(names), "merging tensors"):
            if name not in table:
                yield name, reference[name]
                continue
            shape = (len(sources), *tensor_shape(reference, name))
            with_base = needs_base or (takes_base and state.base is not None)
            key = tuple(weights_of[name])
            if key not in made:
                made[key] = torch.tensor(key, dtype=compute_dtype, device=state.device)
            result, stored, stored_base = None, None, None
            if streamed is not None:
                # The method reads the inputs as stored, in pieces (see `merge_method`).
                stored, stored_base = _read_stored(state, sources, name, with_base)
                out = torch.empty(shape[1:], dtype=tensor_dtype(reference, name))
                with one_thread():
                    result = streamed(
                        stored, weights=made[key], base=stored_base, out=out,
                        compute_dtype=compute_dtype, workers=workers, **table[name],
                    )  # fmt: skip
            if stored is not None and result is None:
                # The stack form runs on the inputs that a declining streamed form read.
                _refuse_broken_inputs(state, sources, name, stored, stored_base)
            if result is None:
                stack, base = _stacked(
                    state, sources, name, shape, compute_dtype, workspace, with_base, stored,
                    stored_base,
                )  # fmt: skip
                extra = {"base": base} if with_base else {}
                if takes_generator:
                    seed = state.loaded.recipe.seed
                    extra["generator"] = _generator_for(seed, name, state.device)
                result = fn(stack, weights=made[key], **extra, **table[name])
            if result.numel() and not _finite(result):
                if stored is not None:
                    # A streamed form's inputs are checked only now (a NaN or inf in any of
                    # them reaches its output): to blame the right file.
                    _refuse_broken_inputs(state, sources, name, stored, stored_base)
                raise MergeCliError(
                    f"merge: tensor '{name}' came out with NaN or inf values; check the "
                    "method's parameters (e.g. weights that sum to 0)"
                )
            result = result.to(tensor_dtype(reference, name)).cpu()
            # The next tensor reuses the workspace, and the writer may still be writing this.
            yield name, result.clone() if workspace.holds(result) else result


def _read_stored(
    state: MergeState, sources: list[StateDict], name: str, with_base: bool
) -> tuple[list[Tensor], Tensor | None]:
    """Each model's ``name`` and the base's as stored (from a file: mapped, not copied; the
    mapping goes with the tensor), not yet checked for NaN or inf (`_refuse_broken_inputs`)."""
    inputs = [_stored(source, name) for source in sources]
    stored_base = _stored(state.base.tensors, name) if with_base else None
    return inputs, stored_base


def _stored(source: StateDict, name: str) -> Tensor:
    return source.mapped(name) if isinstance(source, LazyTensors) else source[name]


def _refuse_broken_inputs(
    state: MergeState,
    sources: list[StateDict],
    name: str,
    stored: list[Tensor],
    stored_base: Tensor | None,
) -> None:
    for model, source, tensor in zip(state.models, sources, stored, strict=True):
        _refuse_broken(state, model, source, name, tensor)
    if stored_base is not None:
        _refuse_broken(state, state.base, state.base.tensors, name, stored_base)


def _stacked(
    state: MergeState,
    sources: list[StateDict],
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    workspace: Workspace,
    with_base: bool,
    stored: list[Tensor] | None = None,
    stored_base: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The models' ``name`` as the rows of one stack in ``dtype`` (the method's to overwrite)
    and the base's in ``dtype``; from ``stored`` where a streamed form read them already."""
    # Each input is converted straight into its row: no float32 copy beside the stack.
    stack = workspace.take("stack", shape, dtype)
    for i, (row, model, source) in enumerate(zip(stack, state.models, sources, strict=True)):
        if stored is not None:
            row.copy_(stored[i])
        else:
            _input_into(row, state, model, source, name, workspace)
    if not with_base:
        return stack, None
    base = workspace.take("base stack", shape[1:], dtype)
    if stored_base is not None:
        base.copy_(stored_base)
    else:
        _input_into(base, state, state.base, state.base.tensors, name, workspace)
    return stack, base


def _input_into(
    out: Tensor,
    state: MergeState,
    model: Checkpoint,
    source: StateDict,
    name: str,
    workspace: Workspace,
) -> None:
    """``source[name]`` into ``out``; from a file, read into a reused buffer (or straight into
    ``out`` when no conversion is needed) and refused if it holds NaN or inf."""
    if not isinstance(source, LazyTensors):
        out.copy_(_finite_input(state, model, source, name))
        return
    nbytes = source.nbytes(name)
    straight = out.device.type == "cpu" and out.dtype == source.dtype(name)
    buffer = (
        out.view(-1).view(torch.uint8)
        if straight
        else workspace.take("read", (nbytes,), torch.uint8, "cpu")
    )
    tensor = _finite_input(state, model, source, name, buffer)
    if not straight:
        out.copy_(tensor)


def _finite_input(
    state: MergeState,
    model: Checkpoint,
    source: StateDict,
    name: str,
    buffer: Tensor | None = None,
) -> Tensor:
    """``source[name]`` (read into ``buffer`` if given), refused if it holds NaN or inf.
    Checkpoints read out of core were not checked when loaded (that would read them twice),
    so a broken input is caught here, where it can still be blamed on its file rather than on
    the method."""
    use_buffer = buffer is not None and isinstance(source, LazyTensors)
    tensor = source.read(name, buffer) if use_buffer else source[name]
    _refuse_broken(state, model, source, name, tensor)
    return tensor


def _refuse_broken(
    state: MergeState, model: Checkpoint, source: StateDict, name: str, tensor: Tensor
) -> None:
    if state.streaming and tensor.numel() and not _finite(tensor):
        where = source.file_of(name) if isinstance(source, LazyTensors) else model.spec.path
        raise MergeCliError(
            f"{where}: tensor '{name}' contains NaN or inf values; the checkpoint is broken "
            "(re-train or re-export it)"
        )


def _finite(tensor: Tensor) -> bool:
    """max and min carry any NaN or inf: one reduction pass (``aminmax``; 3x faster than
    ``amax`` and ``amin`` on bf16) instead of a mask the tensor's size."""
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _per_model_settings(
    state: MergeState, params: type[StepParams], names: tuple[str, ...]
) -> dict[str, list[Any]]:
    """Per parameter that some checkpoint sets for itself, every model's setting (in model
    order; ``NO_MATCH`` where a checkpoint sets none), validated like the step's own."""
    own: dict[str, list[Any]] = {}
    for key in names:
        settings = [m.spec.parameters or {} for m in state.models]
        if not any(key in setting for setting in settings):
            continue
        own[key] = [
            getattr(params.model_validate({key: setting[key]}), key) if key in setting else NO_MATCH
            for setting in settings
        ]
    return own


def _generator_for(seed: int, tensor_name: str, device: torch.device) -> torch.Generator:
    """A generator seeded by (seed, tensor name): the same draws whatever the tensor order."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little"))
