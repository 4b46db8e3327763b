"""The recipe: pydantic schema, YAML loading with line numbers, `--set` overrides, resolution."""

from __future__ import annotations

import difflib
import hashlib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from mergecli.errors import RecipeError
from mergecli.registry import STEP_KINDS, StepParams, default_method, methods_of
from mergecli.schema import RecipeModel
from mergecli.yaml_lines import Path_, load_yaml_with_lines


class Strict(RecipeModel):
    """A recipe section: unknown keys and non-finite floats are errors."""


class ModelSpec(Strict):
    """What the checkpoints instantiate: a built-in name or ``package.module:factory``."""

    arch: str
    args: dict[str, Any] = Field(default_factory=dict)
    input_shape: list[int] | None = None

    @field_validator("input_shape")
    @classmethod
    def _positive_dims(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(d < 1 for d in value)):
            raise ValueError("must be a non-empty list of positive sizes, e.g. [1, 28, 28]")
        return value


class CheckpointSpec(Strict):
    """One input checkpoint: a safetensors file, a sharded directory or a model directory."""

    path: str
    sha256: str | None = None
    role: Literal["reference", "base"] | None = None
    weight: float = 1.0
    name: str | None = None
    # This model's own values of the merge method's per-model parameters (e.g. density),
    # like mergekit's `models[].parameters`.
    parameters: dict[str, Any] | None = None

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be 64 hexadecimal characters (`sha256sum FILE` prints it)")
        return value.lower() if value else value


class DataSpec(Strict):
    """A data source with its subset options."""

    source: Literal["mnist", "tensors", "python"]
    split: str | None = None
    path: str | None = None
    x: str | None = None
    y: str | None = None
    factory: str | None = None
    args: dict[str, Any] | None = None
    batch_size: int = Field(default=256, gt=0)
    fraction: float | None = Field(default=None, gt=0, le=1)
    classes: list[int] | None = None
    balanced: bool = False

    @model_validator(mode="after")
    def _keys_fit_source(self) -> DataSpec:
        own = {"mnist": {"split"}, "tensors": {"path", "x", "y", "split"}}
        own["python"] = {"factory", "args"}
        foreign = [
            key
            for key in ("split", "path", "x", "y", "factory", "args")
            if getattr(self, key) is not None and key not in own[self.source]
        ]
        if foreign:
            raise ValueError(f"source '{self.source}' takes no {', '.join(foreign)}")
        if self.source == "tensors" and self.path is None:
            raise ValueError("source 'tensors' needs `path` (a .safetensors or .npz file)")
        if self.source == "python" and self.factory is None:
            raise ValueError("source 'python' needs `factory: package.module:function`")
        return self


class DataSection(Strict):
    fit: DataSpec | None = None
    eval: DataSpec | None = None


class OutputSpec(Strict):
    dir: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    shard_size: int | None = None

    @field_validator("shard_size", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        if isinstance(value, str):
            from mergecli.io.sizes import parse_size

            return parse_size(value)
        return value

    @field_validator("shard_size")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError("must be a positive size such as 5GB or 500MB")
        return value


class SlurmSpec(Strict):
    """How the run behaves inside a SLURM job (not what it computes)."""

    requeue: bool = False  # after a stop signal, put the job back in the queue


class Recipe(Strict):
    """The top level of a recipe file."""

    version: Literal[1] = 1
    name: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    model: ModelSpec | None = None
    checkpoints: list[CheckpointSpec] = Field(min_length=1)
    data: DataSection = Field(default_factory=DataSection)
    steps: list[Any] = Field(default_factory=list)
    output: OutputSpec = Field(default_factory=OutputSpec)
    slurm: SlurmSpec | None = None

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, value: str | None) -> str | None:
        # The default output dir is out/<name>: a name with a path in it would write elsewhere.
        if value is not None and (
            value in ("", ".", "..") or any(c in value for c in ("/", "\\", "\0"))
        ):
            raise ValueError(
                "must be a plain name (not empty, '.' or '..'; no '/', '\\' or NUL) since the "
                "output goes to out/<name>; to write elsewhere set output.dir"
            )
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @model_validator(mode="after")
    def _roles(self) -> Recipe:
        for role in ("reference", "base"):
            if sum(c.role == role for c in self.checkpoints) > 1:
                raise ValueError(f"more than one checkpoint has role: {role}")
        return self


@dataclass(frozen=True)
class StepSpec:
    """One resolved step: its kind, method and validated parameters."""

    index: int
    kind: str
    method: str
    params: StepParams

    def as_dict(self) -> dict[str, Any]:
        params = self.params.model_dump(mode="json", by_alias=True)
        key = "kind" if self.kind == "analyze" else "method"
        return {self.kind: {key: self.method, **params}}


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe with its resolved steps and where it came from."""

    recipe: Recipe
    steps: list[StepSpec]
    source: str

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.output.dir or f"out/{self.recipe.name}")

    def resolved(self) -> dict[str, Any]:
        """The recipe with every default filled in and overrides applied."""
        data = self.recipe.model_dump(mode="json", exclude_none=True)
        data["output"]["dir"] = str(self.output_dir)
        data["steps"] = [step.as_dict() for step in self.steps]
        return data

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False)

    def sha256(self) -> str:
        """What the run computes: the resolved recipe without its `slurm` section, which only
        says how to run, so that adding `requeue` neither changes the output's metadata nor
        stops an interrupted run from resuming."""
        resolved = self.resolved()
        resolved.pop("slurm", None)
        return hashlib.sha256(yaml.safe_dump(resolved, sort_keys=False).encode()).hexdigest()


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> LoadedRecipe:
    """Read, override, validate and resolve a recipe; raise RecipeError listing every problem."""
    path = Path(path)
    filename = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError([f"{filename}: no such recipe file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([f"{filename}: cannot read the recipe ({exc})"]) from None
    data, lines = load_yaml_with_lines(text, filename)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{filename}:1: the recipe must be a mapping of keys (version, ...)"])
    _expand_method_names(data)
    overridden = apply_overrides(data, overrides or [])
    where = _Locator(filename, lines, overridden)
    return validate_recipe(data, where, default_name=path.stem)


def _expand_method_names(data: dict[str, Any]) -> None:
    """``- merge: ties`` is short for ``- merge: {method: ties}`` (``analyze``: ``{kind: ...}``),
    expanded before overrides so that ``--set steps.0.merge.density=0.3`` finds a mapping."""
    steps = data.get("steps")
    for step in steps if isinstance(steps, list) else []:
        if isinstance(step, dict) and len(step) == 1:
            kind, body = next(iter(step.items()))
            if isinstance(body, str):
                step[kind] = {"kind" if kind == "analyze" else "method": body}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> set[Path_]:
    """Apply ``dotted.key=value`` overrides in place (values parsed as YAML); return their paths."""
    applied: set[Path_] = set()
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise RecipeError([f"--set {override}: expected dotted.key=value"])
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            node = _descend(node, part, key, create=isinstance(parts[i + 1], str))
        last = parts[-1]
        if isinstance(node, list):
            if not isinstance(last, int) or last >= len(node):
                raise RecipeError(
                    [f"--set {key}: there is no item {last} (the list has {len(node)})"]
                )
            node[last] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError([f"--set {key}: {'.'.join(map(str, parts[:-1]))} is not a mapping"])
        applied.add(tuple(parts))
    return applied


def _descend(node: Any, part: str | int, key: str, create: bool) -> Any:
    if isinstance(node, list):
        if not isinstance(part, int) or part >= len(node):
            raise RecipeError([f"--set {key}: there is no item {part} (the list has {len(node)})"])
        return node[part]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            if not create:
                raise RecipeError([f"--set {key}: there is no list at {part}"])
            node[part] = {}
        return node[part]
    raise RecipeError([f"--set {key}: cannot set a key inside {type(node).__name__}"])


@dataclass(frozen=True)
class _Locator:
    """Turns a key path into ``file:line: dotted.key`` (or ``--set dotted.key`` when overridden)."""

    filename: str
    lines: dict[Path_, int]
    overridden: set[Path_]

    def __call__(self, path: Path_, message: str) -> str:
        dotted = ".".join(str(p) for p in path) or "(top level)"
        for length in range(len(path), 0, -1):
            if path[:length] in self.overridden:
                return f"--set {'.'.join(str(p) for p in path[:length])}: {dotted}: {message}"
        for length in range(len(path), -1, -1):
            if path[:length] in self.lines:
                return f"{self.filename}:{self.lines[path[:length]]}: {dotted}: {message}"
        return f"{self.filename}: {dotted}: {message}"


def validate_recipe(data: dict[str, Any], where: _Locator, default_name: str) -> LoadedRecipe:
    """Validate the top level, then each step against its registered method."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_problems(exc, Recipe, (), data, where)) from None
    if recipe.name is None:
        recipe.name = default_name
    problems: list[str] = []
    steps: list[StepSpec] = []
    for index, raw in enumerate(recipe.steps):
        step = _validate_step(index, raw, data, where, problems)
        if step is not None:
            steps.append(step)
    if not recipe.steps:
        # A recipe without steps would run, write no model and exit 0: surely a mistake.
        problems.append(where(("steps",), "no steps; add at least one, e.g. `- merge: average`"))
    problems += _unmet_needs(recipe, steps, where)
    problems += _per_model_problems(recipe, steps, data, where)
    if problems:
        raise RecipeError(problems)
    return LoadedRecipe(recipe, steps, where.filename)


def _validate_step(
    index: int, raw: Any, data: dict[str, Any], where: _Locator, problems: list[str]
) -> StepSpec | None:
    at: Path_ = ("steps", index)
    if not isinstance(raw, dict) or len(raw) != 1:
        problems.append(where(at, f"a step is one key, one of {', '.join(STEP_KINDS)}"))
        return None
    kind, body = next(iter(raw.items()))
    if kind not in STEP_KINDS:
        problems.append(where((*at, kind), _unknown("step kind", kind, STEP_KINDS)))
        return None
    body = {} if body is None else body
    if not isinstance(body, dict):
        problems.append(where((*at, kind), "must be a mapping of parameters, e.g. {method: ...}"))
        return None
    available = methods_of(kind)
    # An analysis is named by `kind:` (`analyze: {kind: interpolation}`); `method:` also works.
    key = "kind" if kind == "analyze" and "kind" in body else "method"
    method = body.get(key, default_method(kind))
    if method is None:
        names = ", ".join(available) or "none yet"
        problems.append(where((*at, kind), f"needs `method:` (available: {names})"))
        return None
    if method not in available:
        what = "analysis kind" if kind == "analyze" else f"{kind} method"
        problems.append(where((*at, kind, key), _unknown(what, method, available)))
        return None
    params_cls = available[method].params
    params = {k: v for k, v in body.items() if k != key}
    try:
        validated = params_cls.model_validate(params)
    except ValidationError as exc:
        problems += _problems(exc, params_cls, (*at, kind), data, where)
        return None
    return StepSpec(index, kind, method, validated)


def _per_model_problems(
    recipe: Recipe, steps: list[StepSpec], data: dict[str, Any], where: _Locator
) -> list[str]:
    """`checkpoints[].parameters` must be per-model parameters of the recipe's merge steps."""
    problems = []
    merges = [methods_of("merge")[s.method] for s in steps if s.kind == "merge"]
    for index, checkpoint in enumerate(recipe.checkpoints):
        for key, value in (checkpoint.parameters or {}).items():
            at = ("checkpoints", index, "parameters", key)
            takers = [m for m in merges if key in m.per_model]
            if not takers:
                offered = sorted({p for m in merges for p in m.per_model})
                names = ", ".join(m.name for m in merges) or "no merge step"
                problems.append(where(at, f"not a per-model parameter of {names} (these are: "
                                          f"{', '.join(offered) or 'none'})"))  # fmt: skip
                continue
            for method in takers:
                try:
                    method.params.model_validate({key: value})
                except ValidationError as exc:
                    problems.append(where(at, exc.errors()[0]["msg"]))
                    break
    return problems


def _unmet_needs(recipe: Recipe, steps: list[StepSpec], where: _Locator) -> list[str]:
    problems = []
    for step in steps:
        method = methods_of(step.kind)[step.method]
        reuses_saved = getattr(step.params, "from_", None) is not None
        for need in sorted(method.needs):
            if need.startswith("data.") and reuses_saved:
                continue  # re-applying saved transforms or coefficients needs no data
            if need in ("data.fit", "data.eval") and getattr(recipe.data, need[5:]) is None:
                problems.append(
                    where(
                        ("steps", step.index, step.kind),
                        f"{step.method} needs {need}; add `data: {{{need[5:]}: {{source: ...}}}}`",
                    )
                )
            if need == "data" and recipe.data.fit is None and recipe.data.eval is None:
                problems.append(
                    where(
                        ("steps", step.index, step.kind),
                        f"{step.method} needs data; add `data: {{eval: {{source: ...}}}}`",
                    )
                )
            if need == "base" and not any(c.role == "base" for c in recipe.checkpoints):
                problems.append(
                    where(
                        ("steps", step.index, step.kind),
                        f"{step.method} needs a base model; mark one checkpoint `role: base`",
                    )
                )
    return problems


def _problems(
    exc: ValidationError,
    root: type[BaseModel],
    prefix: Path_,
    data: dict[str, Any],
    where: _Locator,
) -> list[str]:
    """One ``file:line: key: message`` line per pydantic error."""
    problems = []
    errors = [(tuple(p for p in e["loc"] if not _is_internal(p)), e) for e in exc.errors()]
    # A misspelt required key is reported once, as the misspelling, not also as missing.
    suggested = set()
    for loc, error in errors:
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _allowed_keys(root, loc[:-1]), n=1)
            suggested.update((*loc[:-1], name) for name in close)
    reported: set[Path_] = set()
    for loc, error in errors:
        path = _data_path(data, prefix, loc, missing=error["type"] == "missing")
        if error["type"] == "missing" and loc in suggested:
            continue
        if path in reported:
            continue  # a value failing every form of a union: report its first (scalar) form
        reported.add(path)
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, loc[:-1])
            message = _unknown("key", str(loc[-1]), allowed)
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            message = error["msg"]
            message = message[0].lower() + message[1:]
            if message.startswith("value error, "):
                message = message[len("value error, ") :]
            given = error.get("input")
            if isinstance(given, (int, float, str, bool)) and error["type"] != "value_error":
                message += f" (got {given!r})"
        problems.append(where(path, message))
    return problems


def _data_path(data: Any, prefix: Path_, loc: Path_, missing: bool) -> Path_:
    """The error's location as keys of the recipe, dropping pydantic's union-member tags."""
    node: Any = data
    for part in prefix:
        node = node[part] if isinstance(node, (dict, list)) else None
    path = list(prefix)
    for i, part in enumerate(loc):
        if _has(node, part):
            node = node[part]
        elif not (missing and i == len(loc) - 1):
            continue  # a tag pydantic added, not a key of the recipe
        path.append(part)
    return tuple(path)


def _has(node: Any, part: str | int) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and part < len(node)


def _is_internal(part: str | int) -> bool:
    """Pydantic adds entries such as 'function-after[...]' to error locations."""
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def _allowed_keys(model: type[BaseModel], loc: Path_) -> list[str]:
    """The keys the schema accepts at ``loc`` (used for "did you mean")."""
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return []
            annotation = field.annotation
        elif typing.get_origin(annotation) in (list, dict):
            annotation = typing.get_args(annotation)[-1]
        else:
            return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [field.alias or name for name, field in annotation.model_fields.items()]
    return []


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _unknown(what: str, name: str, allowed: Any) -> str:
    allowed = list(allowed)
    close = difflib.get_close_matches(str(name), allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    listing = f" (allowed: {', '.join(allowed)})" if allowed else ""
    return f"unknown {what} '{name}'{hint}{listing}"
