"""Run a recipe: check inputs, load checkpoints, run the steps in order, write the output."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergecli import __version__
from mergecli.errors import MergeCliError
from mergecli.io import load_state_dict, read_metadata, save_state_dict, sha256_in_background
from mergecli.io.lazy import LazyTensors, tensor_dtype, tensor_shape
from mergecli.io.output_dir import STATE, OutputDir
from mergecli.io.safetensors_format import write_safetensors
from mergecli.io.writer import ShardWriter
from mergecli.model_card import CARD_NAME, model_card
from mergecli.models.metadata import model_metadata
from mergecli.preflight import (
    Checked,
    check_inputs,
    check_tensors,
    data_specs,
    needs_a_model,
    reference_index,
)
from mergecli.recipe import LoadedRecipe
from mergecli.registry import changes_weights, methods_of
from mergecli.report import render_report
from mergecli.runtime.distributed import current as current_world
from mergecli.runtime.log import Log
from mergecli.runtime.signals import STOP, Stopped
from mergecli.state import Checkpoint, MergeState, StateDict

OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run_recipe(
    loaded: LoadedRecipe, log: Log, resume: bool = True, overwrite: bool = False
) -> MergeState:
    """Everything `mergecli run` does after the recipe validated.

    Long steps keep resumable state in ``output.dir/.state/``; ``resume=False`` discards it.
    ``overwrite`` lets the run replace an output directory holding files it did not write.
    """
    recipe = loaded.recipe
    # Before the output dir is touched: a recipe naming inputs that are not there, or do not
    # fit each other, the model or the data, writes nothing.
    checked = check_inputs(loaded)
    torch.manual_seed(recipe.seed)
    world = current_world()
    out_dir = loaded.output_dir
    output = OutputDir(out_dir, input_paths(loaded), overwrite)
    resume_dir = out_dir / STATE
    # Rank 0 alone touches the output directory; the others read the fit state it keeps.
    problem = None
    if world.is_main:
        try:
            output.open()
            if not resume and resume_dir.exists():
                shutil.rmtree(resume_dir)
        except MergeCliError as exc:
            problem = exc
    if world.any(problem is not None):  # also the barrier: .state is cleared before any reads
        raise problem or MergeCliError(f"{out_dir}: rank 0 cannot write the output directory")
    step = None
    try:
        state = prepare_state(loaded, log, checked=checked)
        state.resume_dir = resume_dir
        for step in loaded.steps:
            method = methods_of(step.kind)[step.method]
            source = getattr(step.params, "from_", None)  # then the method does not run
            how = f"from {source}" if source else f"({step.method})"
            log.info(f"step {step.index}: {step.kind} {how}")
            started = time.perf_counter()
            state.step = step
            try:
                method.run(state, step.params)
            except MergeCliError as exc:
                exc.within(f"steps.{step.index} ({step.kind} {step.method})")
                raise
            if changes_weights(step.kind):
                state.history.append(step.method)
            state.report.setdefault("timings_s", {})[f"{step.index}.{step.kind}"] = round(
                time.perf_counter() - started, 3
            )
        step = None
        if world.is_main:
            # Publishing replaces the directory, and its resumable state with it.
            write_outputs(state, output)
    except Stopped as stop:
        if not stop.detail:
            stop.detail = (
                f"during step {step.index} ({step.kind})" if step else "while writing the output"
            )
        if stop.saved is None and resume_dir.is_dir() and any(resume_dir.iterdir()):
            stop.saved = resume_dir
        raise
    finally:
        if world.is_main:
            output.release()
    return state


def input_paths(loaded: LoadedRecipe) -> list[Path]:
    """Every file the recipe reads: the recipe, checkpoints, data files, saved alignments."""
    recipe = loaded.recipe
    paths = [Path(loaded.source)] + [Path(c.path) for c in recipe.checkpoints]
    specs = [spec for _, spec in data_specs(recipe)]
    paths += [Path(p) for s in specs for p in (s.path, s.tokenizer) if p]
    paths += [Path(p) for s in loaded.steps if (p := getattr(s.params, "from_", None))]
    return paths


def prepare_state(
    loaded: LoadedRecipe, log: Log, needs_model: bool = False, checked: Checked | None = None
) -> MergeState:
    """Check the inputs (unless ``checked`` is what `check_inputs` found), load every
    checkpoint and decide the model (``needs_model``: the caller builds it whatever the steps
    are, as `align-spec` does)."""
    if checked is None:
        checked = check_inputs(loaded, needs_model)
    recipe = loaded.recipe
    device = current_world().device_for(recipe.device)
    streaming = is_data_free(loaded)
    checkpoints: list[Checkpoint] = []
    unhashed = [i for i in range(len(recipe.checkpoints)) if i not in checked.digests]
    hashing = sha256_in_background([recipe.checkpoints[i].path for i in unhashed])
    digests: dict[int, str | Future[str]] = {
        **checked.digests,
        **dict(zip(unhashed, hashing, strict=True)),
    }
    for index, spec in enumerate(recipe.checkpoints):
        digest = digests[index]
        name = spec.name or _display_name(spec.path, index)
        if any(c.name == name for c in checkpoints):
            name = f"{name}#{index}"  # tables and saved transforms are keyed by name
        if streaming:
            tensors = LazyTensors(spec.path)  # read tensor by tensor while merging
        else:
            tensors = load_state_dict(spec.path)
            _check_finite(spec.path, tensors)
        metadata = read_metadata(spec.path)
        checkpoints.append(Checkpoint(spec, name, digest, tensors, metadata, index=index))
        log.info(f"loaded {spec.path}", tensors=len(tensors))
    copied = check_tensors(loaded, checkpoints)
    reference = reference_index(recipe.checkpoints)
    state = MergeState(loaded, checkpoints, reference, device, log, checked.model)
    state.streaming = streaming
    state.copied_from_base = copied
    if copied:
        log.warn(
            f"{len(copied)} tensor(s) missing from some models are copied from the base "
            f"(missing: copy_from_base): {', '.join(repr(n) for n in sorted(copied)[:5])}"
            + (f" and {len(copied) - 5} more" if len(copied) > 5 else "")
        )
    if recipe.model is not None or needs_a_model(loaded):
        _check_checkpoints_fit(state)
    state.report["inputs"] = None  # its place in report.json; filled once the digests are in
    return state


def _inputs(state: MergeState) -> list[dict[str, str]]:
    """report.json's `inputs` (waits for digests still being computed)."""
    return [
        {"name": c.name, "path": c.spec.path, "sha256": c.sha256, "role": c.spec.role}
        for c in state.checkpoints
    ]


def model_only_state(loaded: LoadedRecipe, log: Log) -> MergeState:
    """A state whose one checkpoint is the recipe's `model:` freshly built (seeded): what
    `align-spec` shows before any checkpoint has been trained."""
    from mergecli.errors import RecipeError
    from mergecli.models import build_model
    from mergecli.recipe import CheckpointSpec

    recipe = loaded.recipe
    if recipe.model is None:
        raise RecipeError(
            [
                loaded.at(
                    ("checkpoints",),
                    "none of the checkpoints exists, and without them the model comes from "
                    "`model: {arch: ..., args: ...}`, which the recipe lacks; add it",
                )
            ]
        )
    torch.manual_seed(recipe.seed)
    try:
        module = build_model(recipe.model.arch, recipe.model.args)
    except MergeCliError as exc:
        raise RecipeError([loaded.at(("model",), str(exc))]) from None
    spec = CheckpointSpec(path=f"(model: {recipe.model.arch})")
    tensors = {name: t.detach() for name, t in module.state_dict().items()}
    built = Checkpoint(spec, recipe.model.arch, "", tensors, {})
    device = current_world().device_for(recipe.device)
    log.info(f"no checkpoint exists yet: the groups of {recipe.model.arch} built from `model:`")
    return MergeState(loaded, [built], 0, device, log, recipe.model)


def is_data_free(loaded: LoadedRecipe) -> bool:
    """Recipes made only of `merge` steps on no model run out of core, one tensor at a time."""
    steps = loaded.steps
    return loaded.recipe.model is None and bool(steps) and all(s.kind == "merge" for s in steps)


def _display_name(path: str, index: int) -> str:
    stem = Path(path).name
    for suffix in (".safetensors",):
        stem = stem.removesuffix(suffix)
    return stem or f"checkpoint{index}"


def _check_finite(path: str, tensors: StateDict) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise MergeCliError(
                f"{path}: tensor '{name}' contains NaN or inf values; the checkpoint is broken "
                "(re-train or re-export it)"
            )


def _check_checkpoints_fit(state: MergeState) -> None:
    """Load every checkpoint into the module once, so a misfit is reported before any work."""
    from mergecli.models import load_into_model
    from mergecli.models.loading import tied_names

    module = state.build_module()
    tied = tied_names(module)
    dropped: set[str] = set()
    for checkpoint in state.checkpoints:
        dropped |= _one_name_per_tied_tensor(tied, checkpoint)
        load_into_model(module, checkpoint.tensors, checkpoint.spec.path)
    if dropped:
        state.log.info(
            f"{', '.join(repr(n) for n in sorted(dropped))}: the model ties it to another "
            "tensor the checkpoints hold with the same values; merged as that one tensor and "
            "written once, as save_pretrained writes tied weights"
        )


def _one_name_per_tied_tensor(tied: dict[str, list[str]], checkpoint: Checkpoint) -> set[str]:
    """A checkpoint that holds one tied tensor under several names (e.g. a language model's
    token embeddings and its output layer, both written) keeps it under the first only: a
    model calls both with one tensor, and steps that give it both would give two."""
    dropped = set()
    for group in {tuple(group) for group in tied.values()}:
        held = [name for name in group if name in checkpoint.tensors]
        for other in held[1:]:
            if not torch.equal(checkpoint.tensors[held[0]], checkpoint.tensors[other]):
                raise MergeCliError(
                    f"{checkpoint.spec.path}: holds '{held[0]}' and '{other}' with different "
                    "values, but the model ties them (one tensor under both names, e.g. by "
                    "config.json's tie_word_embeddings); untie them in the model's config, or "
                    "save the checkpoint with one of them"
                )
            del checkpoint.tensors[other]
            dropped.add(other)
    return dropped


def output_metadata(state: MergeState, wait: bool = True) -> dict[str, str]:
    """What the merged safetensors carry so that a merge can be traced and reproduced.

    ``wait=False``: an input digest still being computed is written as 64 zeros, the length of
    the digest that replaces it once known (`ShardWriter.close`), so the header is written
    before the tensors without waiting for the hashing."""
    loaded = state.loaded
    digests = {
        c.spec.path: c.sha256 if wait or c.digest_known else "0" * 64 for c in state.checkpoints
    }
    metadata = {
        "format": "pt",
        "mergecli.version": __version__,
        "mergecli.recipe_sha256": loaded.sha256(),
        "mergecli.inputs": json.dumps(digests),
        "mergecli.steps": json.dumps([s.as_dict() for s in loaded.steps]),
        "mergecli.seed": str(loaded.recipe.seed),
    }
    if state.history:  # the methods that shaped the weights, in order
        metadata["mergecli.method"] = " + ".join(state.history)
    if state.model_spec is not None:
        metadata.update(model_metadata(state.model_spec.arch, state.model_spec.args))
    return metadata


def write_outputs(state: MergeState, output_dir: OutputDir) -> None:
    """Merged checkpoint, artifacts, resolved recipe and report, staged and then published as
    one set: the output directory shows either all of this run's files or none of them."""
    output = state.loaded.recipe.output
    staging = output_dir.staging
    paths: list[Path] = []
    if state.merged is not None and not isinstance(state.merged, dict):
        # A streamed merge computes while it writes (long); a stop signal aborts it, and the
        # staged files go away with the staging directory.
        plan = _output_plan(state, OUTPUT_DTYPES.get(output.dtype))
        paths = _write_stream(state, staging, plan, output.shard_size)
    # The rest takes seconds: a signal now waits until the new set is in place.
    with STOP.deferred():
        rendered = _write_finished(state, output_dir, paths)
        output_dir.publish()
    log = state.log
    model = state.report.get("output", {}).get("files", [])
    if model:
        log.info(f"wrote {', '.join(str(output_dir.final(n)) for n in model)}")
    log.info(f"wrote {output_dir.final('report.json')}")
    log.info(f"wrote {', '.join(str(output_dir.final(n)) for n in rendered)}")


def _write_finished(state: MergeState, output_dir: OutputDir, paths: list[Path]) -> list[str]:
    """Write everything but a streamed model into staging; return the rendered report files."""
    output = state.loaded.recipe.output
    staging = output_dir.staging
    if state.merged is not None:
        if isinstance(state.merged, dict):
            dtype = OUTPUT_DTYPES.get(output.dtype)
            if dtype is None:
                state.merged = _in_layout_dtypes(state.merged, state.layout)
            metadata = output_metadata(state)
            paths = save_state_dict(state.merged, staging, metadata, output.shard_size, dtype)
        copied = copy_model_files(state, staging)
        paths += copied
        if any(p.name == "config.json" for p in copied):
            # A Hugging Face model directory: its README.md is the Hub's model card.
            card = staging / CARD_NAME
            card.write_text(model_card(state), encoding="utf-8")
            paths.append(card)
        state.report["output"] = {"files": [p.name for p in paths], "dtype": output.dtype}
    for name, (tensors, metadata) in state.artifacts.items():
        write_safetensors(output_dir.file(name), tensors, metadata)
        state.report.setdefault("artifacts", []).append(name)
    state.report["inputs"] = _inputs(state)
    state.report["name"] = state.loaded.recipe.name
    state.report["recipe_sha256"] = state.loaded.sha256()
    state.report["mergecli_version"] = __version__
    (staging / "recipe.resolved.yaml").write_text(state.loaded.resolved_yaml())
    report = _plain(state.report)
    (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return [p.relative_to(staging).as_posix() for p in render_report(staging, report)]


def _output_plan(state: MergeState, dtype: torch.dtype | None) -> list:
    """Name, shape and dtype of every output tensor, read from the reference's headers."""
    reference = state.layout
    plan = []
    for name in reference:
        own = tensor_dtype(reference, name)
        shape = tensor_shape(reference, name)
        plan.append((name, shape, dtype if dtype and own.is_floating_point else own))
    return plan


def _write_stream(state: MergeState, out_dir: Path, plan, shard_size) -> list[Path]:
    """Consume the merge's (name, tensor) pairs into shards; a failure leaves no shard behind.
    The inputs' digests go into the headers at the end, so hashing overlaps the merge."""
    writer = ShardWriter(out_dir, plan, output_metadata(state, wait=False), shard_size)
    try:
        for name, tensor in state.merged:
            writer.add(name, tensor)
        return writer.close(output_metadata(state))
    except BaseException:
        writer.abort()
        raise


# What makes a Hugging Face model directory loadable besides its weights.
MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "added_tokens.json", "chat_template.jinja",
)  # fmt: skip


def copy_model_files(state: MergeState, out_dir: Path) -> list[Path]:
    """An input that is a model directory makes the output one: copy its config and tokenizer
    (from the base model, else the reference), the config's dtype the one written."""
    source = state.base or state.reference
    folder = Path(source.spec.path)
    if not (folder.is_dir() and (folder / "config.json").is_file()):
        return []
    copied = []
    for name in MODEL_FILES:
        if (folder / name).is_file():
            if name == "config.json":
                dtype = _written_dtype(state)
                _write_config(folder / name, out_dir / name, dtype, state.config_updates)
            else:
                shutil.copyfile(folder / name, out_dir / name)
            copied.append(out_dir / name)
    return copied


def _in_layout_dtypes(merged: dict[str, Tensor], layout: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`output.dtype: auto`: each floating tensor in the reference's dtype, as a streamed merge
    writes it (a fit computes in float32, and bf16 checkpoints should not come out float32)."""
    cast = {}
    for name, tensor in merged.items():
        dtype = tensor_dtype(layout, name) if name in layout else tensor.dtype
        keep = not (tensor.is_floating_point() and dtype.is_floating_point)
        cast[name] = tensor if keep else tensor.to(dtype)
    return cast


def _written_dtype(state: MergeState) -> torch.dtype | None:
    """The dtype of the output's floating-point tensors (the most common one, if mixed)."""
    dtype = OUTPUT_DTYPES.get(state.loaded.recipe.output.dtype)
    if dtype is not None:
        return dtype
    # A streamed merge has written the reference's dtypes; a fit's dict holds its own.
    tensors = state.merged if isinstance(state.merged, dict) else state.layout
    counts = Counter(tensor_dtype(tensors, n) for n in tensors)
    floating = [d for d, _ in counts.most_common() if d.is_floating_point]
    return floating[0] if floating else None


def _write_config(
    source: Path, target: Path, dtype: torch.dtype | None, updates: Mapping[str, Any] | None = None
) -> None:
    """config.json as it is, but for the dtype it names (transformers loads the weights in
    that dtype by default): set to ``dtype``, the one the weights are written in; and for
    ``updates``, the keys a merge changed (the layer count of a passthrough with slices)."""
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = None
    # transformers 5 writes "dtype", 4.x "torch_dtype"; only a key the file has is changed.
    keys = [k for k in ("dtype", "torch_dtype") if isinstance(config, dict) and k in config]
    name = str(dtype).removeprefix("torch.") if dtype is not None else None
    unchanged = name is None or all(config[k] == name for k in keys)
    # Unreadable, it is copied as it is: there is nothing to update.
    if (unchanged and not updates) or not isinstance(config, dict):
        shutil.copyfile(source, target)
        return
    for key in keys if name is not None else ():
        config[key] = name
    config.update(updates or {})
    target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
