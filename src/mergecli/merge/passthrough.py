"""Passthrough: one checkpoint copied, or a model stacked from layer ranges of several."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, model_validator
from torch import Tensor

from mergecli.errors import MergeCliError
from mergecli.io.lazy import tensor_dtype, tensor_shape
from mergecli.merge.parameters import LAYER_INDEX
from mergecli.recipe.schema import RecipeModel, StepParams
from mergecli.registry import step_method

if TYPE_CHECKING:
    from mergecli.recipe import LoadedRecipe
    from mergecli.recipe.schema import Recipe
    from mergecli.state import Checkpoint, MergeState

# Tensors outside the layers that come before them (token and position embeddings); mergekit
# takes these from the first slice's model and every other one (final norm, output head)
# from the last slice's model.
EMBEDDING = re.compile(r"embed|(?:^|\.)(?:wte|wpe)\.")
# config.json keys that hold the layer count, and ones that hold one entry per layer.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


class Slice(RecipeModel):
    """Layers ``[start, end)`` of checkpoint ``model`` (mergekit's ``layer_range``)."""

    model: str
    layers: tuple[int, int]

    @model_validator(mode="after")
    def _ordered(self) -> Slice:
        start, end = self.layers
        if not 0 <= start < end:
            raise ValueError(
                f"layers [{start}, {end}]: give [start, end] with 0 <= start < end (end is "
                "excluded, as in mergekit's layer_range: [0, 2] is layers 0 and 1)"
            )
        return self


class PassthroughParams(StepParams):
    """No slices: the one checkpoint as it is. Slices: their layers stacked in order."""

    slices: list[Slice] | None = Field(None, min_length=1)

    def recipe_problems(self, recipe: Recipe) -> list[tuple[tuple[str | int, ...], str]]:
        count = len(recipe.checkpoints)
        if self.slices is None:
            if count == 1:
                return []
            return [((), f"passthrough without `slices` copies one checkpoint, the recipe has "
                     f"{count}; keep one, or give `slices: [{{model: NAME, layers: [0, 2]}}, "
                     "...]` to stack layers of several")]  # fmt: skip
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if len(recipe.steps) > 1:
            problems.append((("slices",), "passthrough with slices changes the layer count, so "
                             "it must be the recipe's only step; run other steps on its "
                             "output in a second recipe"))  # fmt: skip
        names = recipe_checkpoint_names(recipe)
        for index, piece in enumerate(self.slices):
            if piece.model not in names:
                problems.append((("slices", index, "model"), f"no checkpoint named "
                                 f"'{piece.model}'; the checkpoints are {', '.join(names)} "
                                 "(their `name:`, else the file or directory name)"))  # fmt: skip
        return problems


def recipe_checkpoint_names(recipe: Recipe) -> list[str]:
    """The checkpoints' names as a run gives them: `name:`, else the path's last part without
    `.safetensors`; a repeated name gets `#INDEX`."""
    names: list[str] = []
    for index, spec in enumerate(recipe.checkpoints):
        name = (
            spec.name or Path(spec.path).name.removesuffix(".safetensors") or f"checkpoint{index}"
        )
        names.append(f"{name}#{index}" if name in names else name)
    return names


def layer_split(names: Sequence[str]) -> tuple[str | None, dict[int, list[str]], list[str]]:
    """(the layers' prefix, {layer index: its tensor names}, the tensors outside the layers).

    The prefix is the name up to the index (``model.layers.``); names numbered under more than
    one prefix (a vision tower beside the text layers) have no one stack to slice: an error.
    """
    prefixes: set[str] = set()
    layers: dict[int, list[str]] = {}
    outside: list[str] = []
    for name in names:
        match = LAYER_INDEX.search(name)
        if match is None:
            outside.append(name)
            continue
        prefixes.add(name[: match.start(1)])
        layers.setdefault(int(match.group(1)), []).append(name)
    if len(prefixes) > 1:
        raise MergeCliError(
            f"tensors are numbered as layers under several prefixes ({', '.join(sorted(prefixes))}"
            "); slices need one stack of layers"
        )
    return (prefixes.pop() if prefixes else None), layers, outside


def renumbered(name: str, index: int) -> str:
    """``name`` with its layer index replaced by ``index`` (``model.layers.3.x`` -> ``.0.x``)."""
    match = LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(f"{name!r} has no layer index")
    return f"{name[: match.start(1)]}{index}{name[match.end(1) :]}"


def slice_plan(
    layouts: Mapping[str, Mapping[str, tuple[int, ...]]], slices: Sequence[tuple[str, int, int]]
) -> list[tuple[str, str, str]]:
    """(output name, model, input name) of every output tensor of a frankenmerge.

    ``layouts`` gives each model's tensor shapes by name; ``slices`` are (model, start, end)
    with ``end`` excluded. The layers of the slices are stacked in order and renumbered from
    0; tensors outside the layers are the first slice's model's embeddings and the last slice's
    model's other tensors (final norm, output head), as mergekit 0.1.5 plans them. Every layer
    must hold the same tensors, with the same shapes, as the first; the two models that give
    the outside tensors must agree on them.
    """
    split = {model: layer_split(list(layouts[model])) for model, _, _ in slices}
    for where, (model, start, end) in enumerate(slices):
        prefix, layers, _ = split[model]
        if prefix is None:
            raise MergeCliError(
                f"slice {where}: checkpoint '{model}' has no numbered layers (tensor names "
                "like model.layers.N.*), so there are none to slice; use passthrough without "
                "slices to copy it"
            )
        count = max(layers) + 1
        if end > count:
            raise MergeCliError(
                f"slice {where}: layers [{start}, {end}] reach past checkpoint '{model}', "
                f"which has {count} layers (0 to {count - 1}); end is excluded, at most {count}"
            )
    first_model, first_start, _ = slices[0]
    last_model = slices[-1][0]
    # What every output layer must hold: the first slice's first layer, by name after the index.
    wanted = {_suffix(n): layouts[first_model][n] for n in split[first_model][1][first_start]}
    plan: list[tuple[str, str, str]] = []
    pre = [n for n in split[first_model][2] if EMBEDDING.search(n)]
    post = [n for n in split[last_model][2] if not EMBEDDING.search(n)]
    _check_outside(layouts, split, first_model, last_model)
    plan += [(name, first_model, name) for name in pre]
    out = 0
    for model, start, end in slices:
        layers = split[model][1]
        for index in range(start, end):
            found = {_suffix(n): layouts[model][n] for n in layers.get(index, [])}
            if found != wanted:
                raise MergeCliError(_layer_mismatch(model, index, found, first_model, wanted))
            plan += [(renumbered(n, out), model, n) for n in layers[index]]
            out += 1
    plan += [(name, last_model, name) for name in post]
    return plan


def _suffix(name: str) -> str:
    match = LAYER_INDEX.search(name)
    return name[match.end(1) :] if match else name


def _check_outside(
    layouts: Mapping[str, Mapping[str, tuple[int, ...]]],
    split: Mapping[str, tuple[str | None, dict[int, list[str]], list[str]]],
    first: str,
    last: str,
) -> None:
    """The first and last slices' models hold the same tensors outside the layers, in the
    same shapes: the embeddings of one then feed the layers and head of the other."""
    ours = {n: layouts[first][n] for n in split[first][2]}
    theirs = {n: layouts[last][n] for n in split[last][2]}
    if ours != theirs:
        odd = sorted(n for n in ours.keys() | theirs.keys() if ours.get(n) != theirs.get(n))
        raise MergeCliError(
            f"checkpoints '{first}' and '{last}' differ outside the layers ("
            + ", ".join(
                f"'{n}': {ours.get(n, 'absent')} vs {theirs.get(n, 'absent')}" for n in odd[:3]
            )  # fmt: skip
            + "); slices need models of one architecture and width"
        )


def _layer_mismatch(model: str, index: int, found: dict, first: str, wanted: dict) -> str:
    odd = sorted(k for k in found.keys() | wanted.keys() if found.get(k) != wanted.get(k))
    shown = ", ".join(f"'{k}': {found.get(k, 'absent')} vs {wanted.get(k, 'absent')}"
                      for k in odd[:3])  # fmt: skip
    return (
        f"layer {index} of checkpoint '{model}' does not match the first slice's layers of "
        f"'{first}' ({shown}); slices need models of one architecture and width"
    )


def plan_of(
    params: PassthroughParams, checkpoints: Sequence[Checkpoint], names: Sequence[str]
) -> list[tuple[str, Checkpoint, str]]:
    """The slice plan over checkpoints called ``names``: (output name, checkpoint, input
    name)."""
    assert params.slices is not None
    by_name = dict(zip(names, checkpoints, strict=True))
    layouts = {
        name: _Shapes(c.tensors) for name, c in by_name.items()
        if any(s.model == name for s in params.slices)
    }  # fmt: skip
    slices = [(s.model, *s.layers) for s in params.slices]
    return [(out, by_name[m], n) for out, m, n in slice_plan(layouts, slices)]


class _Shapes(Mapping[str, tuple[int, ...]]):
    """A checkpoint's tensor shapes by name, read from its headers when it is lazy."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self._tensors = tensors

    def __getitem__(self, name: str) -> tuple[int, ...]:
        return tuple(tensor_shape(self._tensors, name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def check_slice_inputs(loaded: LoadedRecipe, checkpoints: Sequence[Checkpoint]) -> bool:
    """Preflight for a passthrough with slices: the plan can be made (ranges in the models,
    layers of one shape). Returns whether the recipe has such a step (then the checkpoints
    need not hold the same tensors: models of different depths may be sliced)."""
    for step in loaded.steps:
        if (
            step.kind == "merge"
            and isinstance(step.params, PassthroughParams)
            and step.params.slices
        ):
            try:
                plan_of(step.params, checkpoints, recipe_checkpoint_names(loaded.recipe))
            except MergeCliError as exc:
                raise exc.at(("steps", step.index, "merge", "slices")) from None
            return True
    return False


@step_method("merge", "passthrough", PassthroughParams)
def passthrough(state: MergeState, params: PassthroughParams) -> None:
    """Passthrough (mergekit): one checkpoint copied, or layer slices of several stacked."""
    from mergecli.merge.step import _finite_input

    if params.slices is None:
        [only] = state.checkpoints  # the recipe check allows one
        plan = [(name, only, name) for name in only.tensors]
    else:
        plan = plan_of(params, state.checkpoints, [c.name for c in state.checkpoints])
        # The output's names, shapes and dtypes, without reading a tensor.
        state.output_layout = {
            out: torch.empty(tensor_shape(c.tensors, n), dtype=tensor_dtype(c.tensors, n),
                             device="meta")
            for out, c, n in plan
        }  # fmt: skip
        count = sum(end - start for start, end in (s.layers for s in params.slices))
        state.config_updates = config_updates(state, params, count)
        state.log.info(f"passthrough: {len(params.slices)} slice(s), {count} layers")

    def stream() -> Iterator[tuple[str, Tensor]]:
        for out, checkpoint, name in plan:
            tensor = _finite_input(state, checkpoint, checkpoint.tensors, name)
            # A layer used twice must not be one tensor under two names in a dict of results.
            yield out, tensor if state.streaming else tensor.clone()

    state.merged = stream() if state.streaming else dict(stream())


def config_updates(state: MergeState, params: PassthroughParams, count: int) -> dict[str, Any]:
    """What the written config.json changes: the layer count, and each per-layer list made of
    the slices' own entries (from each slice's model's config.json, else the copied one's)."""
    source = state.base or state.reference
    written = _config(Path(source.spec.path))
    if written is None:
        return {}
    updates: dict[str, Any] = {k: count for k in LAYER_COUNT_KEYS if k in written}
    by_name = {c.name: c for c in state.checkpoints}
    assert params.slices is not None
    for key in PER_LAYER_KEYS:
        if not isinstance(written.get(key), list):
            continue
        values: list[Any] = []
        for piece in params.slices:
            own = _config(Path(by_name[piece.model].spec.path)) or {}
            entries = own.get(key) if isinstance(own.get(key), list) else written[key]
            start, end = piece.layers
            if end > len(entries):
                raise MergeCliError(
                    f"config.json of '{piece.model}': {key} has {len(entries)} entries, the "
                    f"slice takes layers up to {end - 1}; fix the model's config.json"
                )
            values += entries[start:end]
        updates[key] = values
    return updates


def _config(folder: Path) -> dict[str, Any] | None:
    file = folder / "config.json"
    if not (folder.is_dir() and file.is_file()):
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None
