"""mergekit 0.1.5 configs as they are: a config (told apart by its top-level `merge_method:`)
translated into the mergecli recipe that computes the same merge, key by key, with every key
mergecli cannot express refused as one line naming it (at its line in the mergekit file)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergecli.errors import Problem, RecipeError
from mergecli.recipe.problems import Locator
from mergecli.recipe.yaml_lines import Path_

# mergekit's merge_method -> mergecli's merge method (mergekit's `linear` is a weighted average,
# divided by the weights' sum unless `normalize: false`: mergecli's `average`).
METHODS = {
    "linear": "average",
    **{name: name for name in (
        "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "nuslerp", "multislerp",
        "karcher", "nearswap", "model_stock", "breadcrumbs", "breadcrumbs_ties", "della",
        "della_linear", "sce", "passthrough",
    )},
}  # fmt: skip
TOP_KEYS = ("merge_method", "models", "base_model", "parameters", "slices", "dtype", "out_dtype",
            "tokenizer_source")  # fmt: skip
# mergekit keys mergecli has nothing for, with what a user can do instead.
UNSUPPORTED = {
    "modules": "per-module merges are not supported; merge each module's models apart",
    "tokenizer": "building a tokenizer is not supported (the base's tokenizer files are copied)",
    "chat_template": "not supported; set the chat template in the output's tokenizer_config.json",
}
# Global parameters that change only how mergekit computes, not what: left out.
DROPPED = {"int8_mask"}  # an int8 sign mask to save memory; the masked entries are the same
# mergekit's `rescale` of methods whose mergecli version has no such parameter: the value
# mergecli always does (DARE rescales; TIES and task arithmetic never do).
FIXED_RESCALE = {"task_arithmetic": False, "ties": False, "dare_linear": True, "dare_ties": True}
DTYPES = {"float32", "float16", "bfloat16", "float64"}
OUT_DTYPES = {"float32", "float16", "bfloat16"}
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def is_mergekit_config(data: Any) -> bool:
    """A mergekit config has `merge_method:` at the top; a mergecli recipe never does."""
    return isinstance(data, dict) and "merge_method" in data and "steps" not in data


def mergekit_to_recipe(config: dict[str, Any], source: Path, out: str | None = None) -> dict:
    """The mergecli recipe mapping of mergekit config ``config`` (read from ``source``)."""
    return translate(config, source, {}, out)[0]


def default_output_dir(source: Path) -> Path:
    """A mergekit config names no output dir (mergekit-yaml takes it as an argument): without
    `--out`, the merge goes beside the config, in ``<config stem>-merged``."""
    return source.parent / f"{source.stem}-merged"


@dataclass(frozen=True)
class MergekitLocator(Locator):
    """Says where a key of the translated recipe came from: ``file:line`` and the key as the
    mergekit config spells it (``models.1.parameters.density``)."""

    origin: dict[Path_, Path_] = field(default_factory=dict)

    def __call__(self, path: Path_, message: str) -> Problem:
        for length in range(len(path), 0, -1):
            if path[:length] in self.overridden:
                return super().__call__(path, message)
        for length in range(len(path), -1, -1):
            if path[:length] in self.origin:
                return super().__call__((*self.origin[path[:length]], *path[length:]), message)
        return super().__call__(path, message)


class _Translation:
    """The recipe being built, where each of its keys came from, and the problems met."""

    def __init__(self, config: dict[str, Any], source: Path, lines: dict[Path_, int]) -> None:
        self.config, self.source, self.lines = config, source, lines
        self.origin: dict[Path_, Path_] = {}
        self.problems: list[Problem] = []
        self.where = Locator(str(source), lines, set())

    def fail(self, at: Path_, message: str) -> None:
        self.problems.append(self.where(at, message))

    def came_from(self, new: Path_, old: Path_) -> None:
        self.origin[new] = old


def translate(
    config: dict[str, Any], source: Path, lines: dict[Path_, int], out: str | None = None
) -> tuple[dict[str, Any], dict[Path_, Path_]]:
    """The recipe and, for each of its key paths that came from the config, the config's key
    path (for messages at the config's lines); RecipeError with one line per unsupported key."""
    t = _Translation(config, source, lines)
    for key in config:
        if key in UNSUPPORTED:
            t.fail((key,), UNSUPPORTED[key])
        elif key not in TOP_KEYS:
            t.fail((key,), f"not a mergekit 0.1.5 key mergecli reads (these are: "
                           f"{', '.join(TOP_KEYS)})")  # fmt: skip
    method = config.get("merge_method")
    if method not in METHODS:
        t.fail(("merge_method",), f"'{method}' is not supported (supported: "
                                  f"{', '.join(METHODS)})")  # fmt: skip
        raise RecipeError(list(t.problems))
    step: dict[str, Any] = {"method": METHODS[method]}
    t.came_from(("steps", 0, "merge", "method"), ("merge_method",))
    t.came_from(("steps", 0, "merge"), ("merge_method",))
    has_models, has_slices = config.get("models") is not None, config.get("slices") is not None
    if has_models == has_slices:
        t.fail(() if not has_models else ("slices",), "give `models:` or `slices:` (one of them)")
        raise RecipeError(list(t.problems))
    base = _model_path(t, config.get("base_model"), ("base_model",))
    if base is None and "base" in _needs(METHODS[method]) and "base_model" not in config:
        t.fail(("merge_method",), f"{method} needs a base_model")
    global_params = _mapping(t, config.get("parameters"), ("parameters",))
    if method == "passthrough" and has_slices:
        checkpoints = _frankenmerge(t, step, base)
    else:
        if has_slices:
            models, global_params, base = _one_full_slice(t, global_params, base)
        else:
            models = _models(t, config["models"], ("models",))
        checkpoints = _checkpoints(t, method, models, base)
    _parameters(t, method, step, checkpoints, global_params)
    recipe: dict[str, Any] = {"version": 1, "name": source.stem, "checkpoints": checkpoints,
                              "steps": [{"merge": step}]}  # fmt: skip
    output: dict[str, Any] = {"dir": out or str(default_output_dir(source))}
    _dtypes(t, method, step, output)
    _tokenizer(t, base)
    recipe["output"] = output
    if t.problems:
        raise RecipeError(list(t.problems))
    return recipe, t.origin


def _needs(method: str) -> frozenset[str]:
    # Imported here: the registry's parameter models import the recipe package.
    from mergecli.registry import methods_of

    return methods_of("merge")[method].needs


def to_yaml(recipe: dict[str, Any]) -> str:
    """The recipe as YAML, lists of numbers on one line (`layers: [0, 2]`) as people write them."""

    class Dumper(yaml.SafeDumper):
        pass

    def represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
        flow = bool(data) and all(_number(e) for e in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    Dumper.add_representer(list, represent_list)
    return yaml.dump(recipe, Dumper=Dumper, sort_keys=False)


def _mapping(t: _Translation, value: Any, at: Path_) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        t.fail(at, "must be a mapping of parameter names to values")
        return {}
    return {key: (v, (*at, key)) for key, v in value.items()}


def _model_path(t: _Translation, value: Any, at: Path_) -> str | None:
    """A model reference: mergecli reads local paths (a directory or a safetensors file)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        t.fail(at, "must be a model's path (mergecli reads local model directories and "
                   "safetensors files; LoRA references are not supported)")  # fmt: skip
        return None
    if "+" in value and not Path(value).exists():
        t.fail(at, "a LoRA reference (model+lora) is not supported: merge the LoRA first")
        return None
    return value


def _models(t: _Translation, models: Any, at: Path_) -> list[tuple[str, dict, Path_]]:
    """`models:` as (path, {parameter: (value, config key)}, config key of the entry)."""
    if not isinstance(models, list) or not models:
        t.fail(at, "must be a list of {model: PATH, parameters: {...}}")
        return []
    out = []
    for index, entry in enumerate(models):
        here = (*at, index)
        if not isinstance(entry, dict):
            t.fail(here, "must be a mapping {model: PATH, parameters: {...}}")
            continue
        for key in entry:
            if key not in ("model", "parameters"):
                t.fail((*here, key), "not supported (a model takes `model` and `parameters`)")
        path = _model_path(t, entry.get("model"), (*here, "model"))
        if path is None:
            if "model" not in entry:
                t.fail(here, "needs `model: PATH`")
            continue
        out.append((path, _mapping(t, entry.get("parameters"), (*here, "parameters")), here))
    return out


def _one_full_slice(
    t: _Translation, global_params: dict[str, Any], base: str | None
) -> tuple[list[tuple[str, dict, Path_]], dict[str, Any], str | None]:
    """Slices of a method other than passthrough: mergecli merges whole models, so one slice
    whose sources each span all of their model's layers (mergekit's own form of `models:`)."""
    slices = t.config["slices"]
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        t.fail(("slices",), f"with merge_method {t.config['merge_method']}, mergecli merges "
                            "whole models: give one slice whose sources span every layer, or "
                            "`models:`")  # fmt: skip
        return [], global_params, base
    piece, at = slices[0], ("slices", 0)
    for key in piece:
        if key not in ("sources", "parameters", "base_model"):
            t.fail((*at, key), "not supported (a slice takes sources, parameters, base_model)")
    own_base = _model_path(t, piece.get("base_model"), (*at, "base_model"))
    if own_base is not None and base is not None and own_base != base:
        t.fail((*at, "base_model"), "differs from the top-level base_model; give one")
    # A slice's parameters come before the global ones, as in mergekit.
    params = {**global_params, **_mapping(t, piece.get("parameters"), (*at, "parameters"))}
    sources = piece.get("sources")
    if not isinstance(sources, list) or not sources:
        t.fail((*at, "sources"), "must be a list of {model: PATH, layer_range: [start, end]}")
        return [], params, own_base or base
    models = []
    for index, entry in enumerate(sources):
        here = (*at, "sources", index)
        if not isinstance(entry, dict):
            t.fail(here, "must be a mapping {model: PATH, layer_range: [start, end]}")
            continue
        for key in entry:
            if key not in ("model", "layer_range", "parameters"):
                t.fail((*here, key), "not supported (a source takes model, layer_range and "
                                     "parameters)")  # fmt: skip
        path = _model_path(t, entry.get("model"), (*here, "model"))
        if path is None:
            continue
        span = entry.get("layer_range")
        layers = _layer_count(path)
        if not (isinstance(span, list) and len(span) == 2 and span[0] == 0):
            t.fail((*here, "layer_range"), "must be [0, number of layers]: mergecli merges whole "
                                           "models")  # fmt: skip
        elif layers is None or span[1] != layers:
            found = f"has {layers} layers" if layers is not None else "has no config.json to count"
            t.fail((*here, "layer_range"), f"the model {found}; with merge_method "
                                           f"{t.config['merge_method']} mergecli merges whole "
                                           "models: give [0, its layer count]")  # fmt: skip
        models.append((path, _mapping(t, entry.get("parameters"), (*here, "parameters")), here))
    return models, params, own_base or base


def _layer_count(path: str) -> int | None:
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(config, dict):
        return None
    counts = [config[key] for key in LAYER_COUNT_KEYS if isinstance(config.get(key), int)]
    return counts[0] if counts else None


def _checkpoints(
    t: _Translation, method: str, models: list[tuple[str, dict, Path_]], base: str | None
) -> list[dict[str, Any]]:
    """The checkpoints: each model, and the base (once, with the parameters it has as a model).
    mergekit's `linear` averages the base only where it is listed among the models, and its
    `slerp` interpolates from the base (t = 0) to the other model: both are plain checkpoints
    there, the base first; every other method takes it as `role: base`."""
    checkpoints: list[dict[str, Any]] = []
    base_entry: dict[str, Any] | None = None
    for path, params, at in models:
        index = len(checkpoints)
        checkpoint: dict[str, Any] = {"path": path}
        t.came_from(("checkpoints", index), at)
        t.came_from(("checkpoints", index, "path"), (*at, "model"))
        for key, (value, where) in params.items():
            if key == "weight":  # a number, a gradient or filters, as mergecli's `weight`
                checkpoint["weight"] = value
                t.came_from(("checkpoints", index, "weight"), where)
            else:
                checkpoint.setdefault("parameters", {})[key] = value
                t.came_from(("checkpoints", index, "parameters", key), where)
        if base is not None and path == base and base_entry is None:
            base_entry = checkpoint
        checkpoints.append(checkpoint)
    if base is not None and base_entry is None:
        if method == "linear":
            message = "linear merges `models:` alone; list the base among them or remove it"
            t.fail(("base_model",), message)
            return checkpoints
        base_entry = {"path": base}
        checkpoints.append(base_entry)
        t.came_from(("checkpoints", len(checkpoints) - 1), ("base_model",))
    if base_entry is not None:
        # The base first: its config.json, tokenizer and dtype are the output's, as mergekit's.
        index = checkpoints.index(base_entry)
        if index:
            checkpoints.insert(0, checkpoints.pop(index))
            _move_origin(t, index)
        if method not in ("linear", "slerp"):
            base_entry["role"] = "base"
    return checkpoints


def _move_origin(t: _Translation, index: int) -> None:
    """Checkpoint ``index`` moved to the front: shift where the keys of the others came from."""
    moved: dict[Path_, Path_] = {}
    for new, old in t.origin.items():
        if new[:1] == ("checkpoints",) and len(new) > 1 and isinstance(new[1], int):
            position = new[1]
            position = 0 if position == index else position + 1 if position < index else position
            moved[("checkpoints", position, *new[2:])] = old
        else:
            moved[new] = old
    t.origin = moved


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _filters_without_catch_all(value: Any) -> bool:
    entries = value if isinstance(value, list) else [value]
    return all(isinstance(e, dict) for e in entries) and all("filter" in e for e in entries)


def _as_filters(value: Any) -> list[Any]:
    """A setting as filter entries: filters as they are, a number or gradient as `{value: V}`."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
        return value
    return [{"value": value}]


def _parameters(
    t: _Translation,
    method: str,
    step: dict[str, Any],
    checkpoints: list[dict[str, Any]],
    params: dict[str, Any],
) -> None:
    """Global parameters -> the merge step's, but for a global `weight` (every model's that
    sets none), what only saves memory in mergekit, and a `rescale` mergecli always does."""
    for key, (value, where) in params.items():
        if key in DROPPED:
            continue
        if key == "weight":
            for index, checkpoint in enumerate(checkpoints):
                if checkpoint.get("role") == "base":
                    continue
                if "weight" not in checkpoint:
                    checkpoint["weight"] = value
                    t.came_from(("checkpoints", index, "weight"), where)
                elif _filters_without_catch_all(checkpoint["weight"]):
                    # mergekit reads a model's filters, then the global setting where none
                    # matches: the global one becomes the model's last, catch-all entries.
                    checkpoint["weight"] = [*_as_filters(checkpoint["weight"]), *_as_filters(value)]
            continue
        if key == "rescale" and method in FIXED_RESCALE:
            if value is not FIXED_RESCALE[method]:
                t.fail(where, f"mergecli's {method} always has rescale: "
                              f"{str(FIXED_RESCALE[method]).lower()}")  # fmt: skip
            continue
        step[key] = value
        t.came_from(("steps", 0, "merge", key), where)


def _frankenmerge(t: _Translation, step: dict[str, Any], base: str | None) -> list[dict]:
    """passthrough's slices, one source each -> `slices: [{model: NAME, layers: [s, e]}]`
    over one checkpoint per model, named after its path."""
    slices = t.config["slices"]
    if not isinstance(slices, list) or not slices:
        t.fail(("slices",), "must be a list of {sources: [{model: PATH, layer_range: [s, e]}]}")
        return []
    names: dict[str, str] = {}
    checkpoints: list[dict[str, Any]] = []
    pieces: list[dict[str, Any]] = []

    def name_of(path: str, at: Path_) -> str:
        if path not in names:
            stem = Path(path).name.removesuffix(".safetensors") or "model"
            name, n = stem, 2
            while name in names.values():
                name, n = f"{stem}-{n}", n + 1
            names[path] = name
            t.came_from(("checkpoints", len(checkpoints)), at)
            checkpoints.append({"path": path, "name": name})
        return names[path]

    for index, piece in enumerate(slices):
        at = ("slices", index)
        if not isinstance(piece, dict):
            t.fail(at, "must be a mapping {sources: [...]}")
            continue
        for key in piece:
            if key != "sources":
                t.fail((*at, key), "not supported with passthrough (a slice takes `sources`)")
        sources = piece.get("sources")
        if not isinstance(sources, list) or len(sources) != 1 or not isinstance(sources[0], dict):
            t.fail((*at, "sources"), "passthrough takes one source per slice: "
                                     "[{model: PATH, layer_range: [start, end]}]")  # fmt: skip
            continue
        source, here = sources[0], (*at, "sources", 0)
        for key in source:
            if key not in ("model", "layer_range"):
                what = "per-slice parameters (such as scale) are" if key == "parameters" else ""
                t.fail((*here, key), f"{what or 'this key is'} not supported with passthrough")
        path = _model_path(t, source.get("model"), (*here, "model"))
        span = source.get("layer_range")
        if path is None or not (isinstance(span, list) and len(span) == 2):
            if path is not None:
                t.fail((*here, "layer_range"), "must be [start, end] (end excluded)")
            continue
        t.came_from(("steps", 0, "merge", "slices", len(pieces)), here)
        t.came_from(("steps", 0, "merge", "slices", len(pieces), "layers"), (*here, "layer_range"))
        pieces.append({"model": name_of(path, (*here, "model")), "layers": list(span)})
    step["slices"] = pieces
    if base is not None:
        # Only where the output's config.json and tokenizer come from, as in mergekit.
        name_of(base, ("base_model",))
        entry = next(c for c in checkpoints if c["path"] == base)
        entry["role"] = "base"
    return checkpoints


def _dtypes(t: _Translation, method: str, step: dict[str, Any], output: dict[str, Any]) -> None:
    """mergekit computes in `dtype` and writes `out_dtype`, else `dtype`."""
    dtype = _dtype(t, "dtype", DTYPES)
    out_dtype = _dtype(t, "out_dtype", OUT_DTYPES)
    if dtype is not None and method != "passthrough":
        step["compute_dtype"] = dtype
        t.came_from(("steps", 0, "merge", "compute_dtype"), ("dtype",))
    written = out_dtype or (dtype if dtype in OUT_DTYPES else None)
    if out_dtype is None and dtype == "float64":
        t.fail(("dtype",), "mergecli writes float32, float16 or bfloat16: add out_dtype")
    if written is not None:
        output["dtype"] = written
        t.came_from(("output", "dtype"), ("out_dtype",) if out_dtype else ("dtype",))


def _dtype(t: _Translation, key: str, allowed: set[str]) -> str | None:
    value = t.config.get(key)
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in allowed:
        t.fail((key,), f"must be one of {', '.join(sorted(allowed))} (got {value!r})")
        return None
    return name


def _tokenizer(t: _Translation, base: str | None) -> None:
    """mergecli copies the base's tokenizer files (else the first model's): mergekit's
    `tokenizer_source: base`; a tokenizer built from several models is not supported."""
    value = t.config.get("tokenizer_source")
    if value is None:
        return
    if value == "base" or (base is not None and value == base):
        if base is None:
            t.fail(("tokenizer_source",), "`base` needs a base_model")
        return
    t.fail(("tokenizer_source",), f"only `base` is supported (the base model's tokenizer "
                                  f"files are copied), not {value!r}")  # fmt: skip
