"""What `validate` checks, and `run` and `align-spec` check first: everything a recipe names
that can be checked without heavy work. Checkpoint files, their safetensors headers and sha256
pins; tensor names and shapes against each other and against the model built on the meta
device; `from:` files; data sources' files and per-example input shapes against that model.
Every problem is a ``file:line: key: message`` line, all of them at once (exit 2)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mergecli.errors import MergeCliError, RecipeError
from mergecli.io import checkpoint_sha256, read_metadata
from mergecli.io.lazy import LazyTensors, tensor_dtype, tensor_shape
from mergecli.merge.passthrough import check_slice_inputs
from mergecli.recipe import LoadedRecipe, ModelSpec
from mergecli.recipe.schema import DataSpec, Recipe
from mergecli.registry import methods_of
from mergecli.state import Checkpoint

Key = tuple[str | int, ...]


@dataclass
class Checked:
    """What the checks found that the run reuses or `validate` shows: the sha256 of each pinned
    checkpoint (hashed once), the model they decided, and what was checked, in words."""

    digests: dict[int, str] = field(default_factory=dict)
    model: ModelSpec | None = None
    summary: list[str] = field(default_factory=list)


def check_inputs(loaded: LoadedRecipe, needs_model: bool = False) -> Checked:
    """Check what ``loaded`` names (``needs_model``: the caller builds the model whatever the
    steps are); raise a RecipeError listing every problem."""
    problems: list[str] = []
    checked = Checked()
    checkpoints = _read_checkpoints(loaded, checked, problems)
    problems += _saved_files(loaded)
    readable = len(checkpoints) == len(loaded.recipe.checkpoints)
    agree = False
    if readable:
        try:
            check_tensors(loaded, checkpoints)
            agree = True
            checked.summary.append(
                f"checkpoints: {len(checkpoints)} readable, names and shapes agree"
            )
        except MergeCliError as exc:
            problems.append(_located(loaded, exc, ("checkpoints",)))
    # Checkpoints that agree with each other fit the model if the first does; ones that
    # disagree are that one problem, not one more per checkpoint.
    against = checkpoints[:1] if agree else []
    build = _model(loaded, checkpoints if readable else [], against, needs_model, checked, problems)
    problems += _data(loaded, checked, build)
    if problems:
        raise RecipeError(problems)
    return checked


def _read_checkpoints(
    loaded: LoadedRecipe, checked: Checked, problems: list[str]
) -> list[Checkpoint]:
    """Each checkpoint's headers (not its tensors) and, where the recipe pins it, its sha256."""
    checkpoints = []
    for index, spec in enumerate(loaded.recipe.checkpoints):
        try:
            tensors = LazyTensors(spec.path)
            metadata = read_metadata(spec.path)
        except MergeCliError as exc:
            problems.append(_located(loaded, exc, ("checkpoints", index, "path")))
            continue
        digest = ""
        if spec.sha256 is not None:
            digest = checkpoint_sha256(spec.path)
            checked.digests[index] = digest
            if digest != spec.sha256:
                problems.append(
                    loaded.at(
                        ("checkpoints", index, "sha256"),
                        f"{spec.path} has sha256 {digest}, the recipe pins {spec.sha256}; "
                        "the file changed: restore it or update the pin",
                    )
                )
        checkpoints.append(Checkpoint(spec, spec.path, digest, tensors, metadata, index=index))
    return checkpoints


def _saved_files(loaded: LoadedRecipe) -> list[str]:
    """The files steps reuse (`from:`) must exist."""
    problems = []
    for step in loaded.steps:
        saved = getattr(step.params, "from_", None)
        if saved and not Path(saved).exists():
            problems.append(
                loaded.at(
                    ("steps", step.index, step.kind, "from"),
                    f"{saved}: no such file; give the output dir (or file) of an earlier run",
                )
            )
    return problems


def _model(
    loaded: LoadedRecipe,
    checkpoints: list[Checkpoint],
    against: list[Checkpoint],
    needs_model: bool,
    checked: Checked,
    problems: list[str],
) -> Callable[[], nn.Module] | None:
    """The recipe's model (or the one the checkpoints' metadata names), built on the meta
    device and checked against the ``against`` checkpoints; returns how to build it (None: no
    model, or none that builds). ``checkpoints`` is empty when some could not be read."""
    from mergecli.models import build_model, check_fits
    from mergecli.models.hf import model_directory
    from mergecli.models.loading import tied_names
    from mergecli.models.metadata import model_from_metadata

    recipe = loaded.recipe
    needed = needs_model or needs_a_model(loaded)
    key: Key = ("model",)
    spec = recipe.model
    if spec is None and checkpoints:
        reference = reference_index(recipe.checkpoints)
        key = ("checkpoints", reference, "path")
        try:
            named = model_from_metadata(
                checkpoints[reference].metadata, checkpoints[reference].spec.path, needed
            )
        except MergeCliError as exc:
            problems.append(_located(loaded, exc, key))
            return None
        spec = None if named is None else ModelSpec(arch=named[0], args=named[1])
    checked.model = spec
    if spec is None:
        return None

    paths = [c.path for c in recipe.checkpoints]
    folder = model_directory(paths[reference_index(recipe.checkpoints)]) if paths else None

    def build() -> nn.Module:
        return build_model(spec.arch, spec.args, model_dir=folder)

    try:
        module = _on_meta(build)
    except MergeCliError as exc:
        if recipe.model is None:
            path = checkpoints[reference_index(recipe.checkpoints)].spec.path
            exc.args = (f"{path}: its metadata names a model that cannot be built: {exc}",)
        problems.append(_located(loaded, exc, key))
        return None
    if recipe.model is not None or needed:
        expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
        tied = tied_names(module)
        fits = bool(against)
        for checkpoint in against:
            given = {n: tensor_shape(checkpoint.tensors, n) for n in checkpoint.tensors}
            try:
                check_fits(expected, given, checkpoint.spec.path, tied=tied)
            except MergeCliError as exc:
                fits = False
                # The recipe's model is what to change; else the checkpoint that names it.
                at = ("model", "args") if recipe.model is not None else _key(checkpoint)
                problems.append(_located(loaded, exc, at))
        if fits:
            checked.summary.append(
                f"model: {spec.arch} (built on the meta device) fits every checkpoint"
            )
    return build


def _on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """The model built on the meta device (shapes, no memory); a factory that cannot build
    there is built for real, which raises its true problem if it has one."""
    try:
        with torch.device("meta"):
            return build()
    except Exception:  # noqa: BLE001 - rebuilt below, where a real problem raises again
        return build()


def _data(
    loaded: LoadedRecipe, checked: Checked, build: Callable[[], nn.Module] | None
) -> list[str]:
    """Each data source's file (header only) and per-example shape, and that shape (and
    `model.input_shape`) through the model."""
    from mergecli.data.model_check import DataUse, check_shape_against_model
    from mergecli.data.sources import describe_source, example_dtype, example_shape
    from mergecli.data.text import with_default_tokenizer
    from mergecli.models import argument_names

    recipe = loaded.recipe
    spec = checked.model
    names = argument_names(spec.arch) if spec is not None and build is not None else []
    shapes: list[tuple[Key, str, list[int], torch.dtype]] = []
    problems = []
    if recipe.model is not None and recipe.model.input_shape and build is not None:
        shapes.append((("model", "input_shape"), "", list(recipe.model.input_shape), torch.float32))
    for key, data in data_specs(recipe):
        where = ".".join(key)
        raw = data.model_dump(exclude_none=True, exclude={"batch_size"})
        if recipe.checkpoints:
            reference = recipe.checkpoints[reference_index(recipe.checkpoints)].path
            raw = with_default_tokenizer(raw, reference)
        try:
            shape = example_shape(raw, recipe.seed, where)
        except MergeCliError as exc:
            problems.append(_located(loaded, exc, key))
            continue
        if shape is None:
            checked.summary.append(
                f"{where}: {describe_source(raw)} (its shape is known when it runs)"
            )
        else:
            shapes.append((key, describe_source(raw), shape, example_dtype(raw, where)))
    for key, source, shape, dtype in shapes:
        if build is None or spec is None:
            checked.summary.append(f"{'.'.join(map(str, key))}: {source}, inputs {shape}")
            continue
        declared = spec.input_shape if key[0] == "data" else None
        use = DataUse("", source, spec.arch, declared, names)
        try:
            check_shape_against_model(shape, build, use, dtype)
        except MergeCliError as exc:
            problems.append(_located(loaded, exc, key))
            continue
        checked.summary.append(
            f"{'.'.join(map(str, key))}: {source + ', ' if source else ''}inputs {shape} fit "
            "the model"
        )
    return problems


def data_specs(recipe: Recipe) -> list[tuple[tuple[str, ...], DataSpec]]:
    """The recipe's data specs with their keys: data.fit, data.eval or each data.eval.NAME."""
    specs: list[tuple[tuple[str, ...], DataSpec]] = []
    if recipe.data.fit is not None:
        specs.append((("data", "fit"), recipe.data.fit))
    if isinstance(recipe.data.eval, dict):
        specs += [(("data", "eval", name), s) for name, s in recipe.data.eval.items()]
    elif recipe.data.eval is not None:
        specs.append((("data", "eval"), recipe.data.eval))
    return specs


def _located(loaded: LoadedRecipe, exc: MergeCliError, key: Key) -> str:
    """``exc`` as a ``file:line`` line at its own key, else at ``key``; a message that starts
    with a deeper key of the same section (``data.fit.path: ...``) is placed at that key."""
    key = exc.key or key
    message = str(exc)
    dotted = ".".join(map(str, key))
    match = re.match(r"([A-Za-z_][\w]*(?:\.[\w]+)*): ", message)
    if match and (match.group(1) + ".").startswith(dotted + "."):
        key = tuple(int(p) if p.isdigit() else p for p in match.group(1).split("."))
        message = message[match.end() :]
    return loaded.at(key, message)


def reference_index(specs: list) -> int:
    """`role: reference` if given, else the first checkpoint that is not the base."""
    for wanted in ("reference", None):
        for index, spec in enumerate(specs):
            if spec.role == wanted:
                return index
    return 0


def needs_a_model(loaded: LoadedRecipe) -> bool:
    """Whether a step of the recipe runs or builds the model."""
    return any("model" in methods_of(s.kind)[s.method].needs for s in loaded.steps)


def check_tensors(loaded: LoadedRecipe, checkpoints: list[Checkpoint]) -> frozenset[str]:
    """The names and shapes must agree; returns the tensors to copy from the base instead."""
    copy_steps = [
        s for s in loaded.steps if getattr(s.params, "missing", "error") == "copy_from_base"
    ]
    base = next((c for c in checkpoints if c.spec.role == "base"), None)
    if check_slice_inputs(loaded, checkpoints):
        return frozenset()  # slices may come from models of different depths
    if not copy_steps:
        _check_same_tensors(checkpoints)
        _check_something_floating(checkpoints[0])
        return frozenset()
    if base is None:
        step = copy_steps[0]
        raise MergeCliError(
            "`missing: copy_from_base` needs a checkpoint with `role: base` to copy from"
        ).at(("steps", step.index, step.kind, "missing"))
    copied: set[str] = set()
    for other in checkpoints:
        if other is base:
            continue
        extra = [n for n in other.tensors if n not in base.tensors]
        if extra:
            raise MergeCliError(
                f"{other.spec.path}: has {_names(extra)}, which the base {base.spec.path} lacks; "
                "`missing: copy_from_base` can only copy tensors the base has"
            ).at(_key(other))
        copied.update(n for n in base.tensors if n not in other.tensors)
    for name in base.tensors:
        holders = [c for c in checkpoints if name in c.tensors]
        for other in holders[1:]:
            _check_shape(holders[0], other, name)
    _check_something_floating(base)
    return frozenset(copied)


def _check_same_tensors(checkpoints: list[Checkpoint]) -> None:
    """Every checkpoint must hold the same tensor names and shapes as the first."""
    first = checkpoints[0]
    for other in checkpoints[1:]:
        missing = [n for n in first.tensors if n not in other.tensors]
        extra = [n for n in other.tensors if n not in first.tensors]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {_names(missing)}")
            if extra:
                parts.append(f"has extra {_names(extra)}")
            raise MergeCliError(
                f"{other.spec.path}: {' and '.join(parts)} compared with {first.spec.path}; "
                "checkpoints to merge must have the same tensors"
            ).at(_key(other))
        for name in first.tensors:
            _check_shape(first, other, name)


def _check_shape(first: Checkpoint, other: Checkpoint, name: str) -> None:
    """Same shape, and both floating or both not: merges average floating tensors and copy the
    others (step counters, position ids) from the reference, so a tensor floating in one
    checkpoint and integer in another would be cast, or copied unmerged, without a word."""
    theirs, ours = tensor_shape(other.tensors, name), tensor_shape(first.tensors, name)
    if theirs != ours:
        raise MergeCliError(
            f"{other.spec.path}: tensor '{name}' has shape {theirs}, {first.spec.path} "
            f"has {ours}; checkpoints to merge must have the same shapes"
        ).at(_key(other))
    theirs, ours = tensor_dtype(other.tensors, name), tensor_dtype(first.tensors, name)
    if theirs.is_floating_point != ours.is_floating_point:
        raise MergeCliError(
            f"{other.spec.path}: tensor '{name}' is {_kind(theirs)} but {_kind(ours)} in "
            f"{first.spec.path}; a tensor must be floating-point in every checkpoint or in none: "
            "re-export the odd one"
        ).at(_key(other))


def _key(checkpoint: Checkpoint) -> Key:
    return ("checkpoints", checkpoint.index, "path")


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        kind = "floating-point"
    else:
        kind = "bool" if dtype == torch.bool else "integer"
    return f"{str(dtype).removeprefix('torch.')} ({kind})"


def _check_something_floating(checkpoint: Checkpoint) -> None:
    """A merge changes floating tensors only: with none there is nothing to merge, and the
    output would be an unchanged copy of the reference."""
    if not any(tensor_dtype(checkpoint.tensors, n).is_floating_point for n in checkpoint.tensors):
        raise MergeCliError(
            f"{checkpoint.spec.path}: none of its {len(checkpoint.tensors)} tensors is "
            "floating-point (all are integer or bool), nor are the other checkpoints', so there "
            "is nothing to merge; check that these are model weights"
        ).at(_key(checkpoint))


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
