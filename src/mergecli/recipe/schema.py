"""The recipe's schema: the pydantic models of its sections and of every step's parameters,
and the loaded recipe (its resolved steps, the resolved YAML and its sha256)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)


class RecipeModel(BaseModel):
    """Unknown keys are errors, and so are inf and nan in any float field: `lr: .inf` would
    otherwise validate and then poison a fit (one rule for every model, not field by field)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StepParams(RecipeModel):
    """Base of every method's parameter model: unknown keys and non-finite floats are errors."""

    def recipe_problems(self, recipe: Recipe) -> list[tuple[tuple[str | int, ...], str]]:
        """What these parameters cannot do with the rest of the recipe, checked before anything
        runs: (key path inside the step, message) pairs. None by default."""
        return []

    def defaults_used(self, recipe: Recipe) -> dict[str, Any]:
        """The values that parameters left unset take from the rest of the recipe (a seed from
        the recipe's), by recipe key: the resolved recipe shows them as values. None here."""
        return {}

    def defaults_described(self, recipe: Recipe) -> dict[str, str]:
        """What parameters left unset do where no one value says it (an initial weight per
        stage), by recipe key: `validate` shows it beside them. Here: their `shown_default`."""
        described = {}
        for name, info in type(self).model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if getattr(self, name) is None and "shown_default" in extra:
                described[info.alias or name] = str(extra["shown_default"])
        return described


def shown_default(text: str) -> dict[str, Any]:
    """A field's ``json_schema_extra`` saying in words what its default (None) does, for
    `mergecli methods`: e.g. ``Field(default=None, json_schema_extra=shown_default(...))``."""
    return {"shown_default": text}


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
    # A number, or (data-free merges only) one that varies by tensor: a gradient over the
    # layers or a list of {filter, value}, as mergekit's per-tensor `weight`.
    weight: Any = 1.0
    name: str | None = None
    # This model's own values of the merge method's per-model parameters (e.g. density),
    # like mergekit's `models[].parameters`.
    parameters: dict[str, Any] | None = None

    @field_validator("weight", mode="before")
    @classmethod
    def _weight_form(cls, value: Any) -> Any:
        from pydantic import TypeAdapter, ValidationError

        from mergecli.merge.parameters import varying

        adapter = TypeAdapter(
            varying("checkpoint_weight", Annotated[float, Field(allow_inf_nan=False)])
        )
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or p == "value")
            # Worded as every other recipe problem (`recipe.problems`): lower case, with the
            # value given where it is one.
            message = "required key is missing" if first["type"] == "missing" else first["msg"]
            message = message[0].lower() + message[1:]
            given = first.get("input")
            if isinstance(given, (int, float, str, bool)) and first["type"] != "missing":
                message += f" (got {given!r})"
            raise ValueError(f"{where + ': ' if where else ''}{message}") from None

    @property
    def varies(self) -> bool:
        """Whether the weight varies by tensor (a gradient or filters), not one number."""
        return isinstance(self.weight, list)

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be 64 hexadecimal characters (`sha256sum FILE` prints it)")
        return value.lower() if value else value


class DataSpec(Strict):
    """A data source with its subset options."""

    source: Literal[
        "mnist", "tensors", "python", "text", "cifar10", "cifar100", "imagefolder", "hf_dataset"
    ]
    split: str | None = None
    path: str | None = None
    x: str | None = None
    y: str | None = None
    mask: str | None = None  # tensors: the attention mask of token ids x (1 token, 0 padding)
    factory: str | None = None
    args: dict[str, Any] | None = None
    # text: the tokenizer (default: the reference checkpoint's directory), the jsonl field
    # (default text), tokens per block (default 256), a cap on the tokens read, the cache
    # directory (default $MERGECLI_CACHE/text or ~/.cache/mergecli/text; false: none).
    tokenizer: str | None = None
    field: str | None = None
    seq_len: int | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    cache: str | bool | None = None
    # Images (cifar10, cifar100, imagefolder): the dataset's directory, CIFAR-100's labels
    # (fine or coarse), an image folder's mode (RGB or L), decoding processes and `cache` (of
    # the decoded images; none by default), the `transform:` steps and whether training passes
    # run their random ones (`augment`).
    root: str | None = None
    labels: Literal["fine", "coarse"] | None = None
    mode: Literal["RGB", "L"] | None = None
    workers: int | None = Field(default=None, ge=0)
    transform: list[dict[str, Any]] | None = None
    augment: bool | None = None
    # hf_dataset: the input column (`image` or `text`; by default a column so named), the label
    # column (default label) and, for text, one padded example per row (`classify`, default) or
    # packed blocks for a language model (`lm`).
    image: str | None = None
    text: str | None = None
    label: str | None = None
    task: Literal["classify", "lm"] | None = None
    batch_size: int = Field(default=256, gt=0)
    fraction: float | None = Field(default=None, gt=0, le=1)
    # Labels to keep; an image folder's classes may be named (a number: the place in name order).
    classes: list[int | str] | None = None
    balanced: bool = False

    # The share of some classes' examples to keep, e.g. {"5-9": 0.1} (a class-biased training
    # set: the other labels are all kept), applied after `partition` (data/subset.py).
    class_fractions: dict[int | str, float] | None = None

    # One model's share: {classes: "0-49"} or {dirichlet: 0.5, parts: 2, part: 0, seed: 0}
    # (data/partition.py), applied after `classes`.
    partition: dict[str, Any] | None = None

    @field_validator("partition")
    @classmethod
    def _partition(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from mergecli.data.partition import parse_partition
        from mergecli.errors import MergeCliError

        try:
            if value is not None:
                parse_partition(value, "partition")
        except MergeCliError as exc:  # pydantic reports ValueErrors at the key
            # "partition.part: ..." -> "part: ...": the error is reported at data.*.partition.
            raise ValueError(str(exc).removeprefix("partition").lstrip(".: ")) from None
        return value

    @field_validator("class_fractions")
    @classmethod
    def _class_fractions(cls, value: dict[int | str, float] | None) -> Any:
        from mergecli.data.subset import parse_class_fractions
        from mergecli.errors import MergeCliError

        try:
            if value is not None:
                parse_class_fractions(value, "class_fractions")
        except MergeCliError as exc:  # reported at data.*.class_fractions
            raise ValueError(str(exc).removeprefix("class_fractions").lstrip(".: ")) from None
        return value

    @model_validator(mode="after")
    def _keys_fit_source(self) -> DataSpec:
        own = {"mnist": {"split"}, "tensors": {"path", "x", "y", "mask", "split"}}
        own["python"] = {"factory", "args"}
        own["text"] = {"path", *TEXT_KEYS}
        own["cifar10"] = {"root", "split", "transform", "augment"}
        own["cifar100"] = {*own["cifar10"], "labels"}
        own["imagefolder"] = {"root", "mode", "workers", "transform", "augment", "cache"}
        own["hf_dataset"] = {"path", "split", *HF_KEYS, "tokenizer", "seq_len", "max_tokens"}
        own["hf_dataset"] |= {"mode", "workers", "transform", "augment"}
        keys = (
            "split", "path", "x", "y", "mask", "factory", "args", *TEXT_KEYS, *IMAGE_KEYS,
            *HF_KEYS,
        )  # fmt: skip
        foreign = [
            key for key in keys if getattr(self, key) is not None and key not in own[self.source]
        ]
        if foreign:
            raise ValueError(f"source '{self.source}' takes no {', '.join(foreign)}")
        if self.source in ("cifar10", "cifar100", "imagefolder"):
            _image_options(self)
        elif self.source == "hf_dataset":
            _hf_options(self)
        elif self.classes is not None and not all(isinstance(c, int) for c in self.classes):
            raise ValueError(
                "classes are integer labels (names only for sources imagefolder and hf_dataset)"
            )
        if self.source == "tensors" and self.path is None:
            raise ValueError("source 'tensors' needs `path` (a .safetensors or .npz file)")
        if self.source == "python" and self.factory is None:
            raise ValueError("source 'python' needs `factory: package.module:function`")
        if self.source == "text" and self.path is None:
            raise ValueError("source 'text' needs `path` (a .txt or .jsonl file or a directory)")
        if self.source == "text" and (
            self.classes is not None
            or self.balanced
            or self.partition is not None
            or self.class_fractions is not None
        ):
            raise ValueError(
                "source 'text' has no classes, so no `classes`, `partition`, `class_fractions` "
                "or `balanced` "
                "(`fraction` keeps "
                "a share of the blocks)"
            )
        return self


def _image_options(spec: DataSpec) -> None:
    """An image source's root, split, transform and augment, checked when the recipe loads."""
    if spec.root is None:
        raise ValueError(f"source '{spec.source}' needs `root` (the dataset's directory)")
    if spec.source != "imagefolder" and spec.split not in (None, "train", "test"):
        raise ValueError(f"source '{spec.source}' has splits train and test, not {spec.split!r}")
    _transform_options(spec)


def _transform_options(spec: DataSpec) -> None:
    """The `transform:` steps parse, and `augment:` has a random one to draw."""
    from mergecli.data.transforms import has_random_step, parse_transform
    from mergecli.errors import MergeCliError

    try:
        steps = parse_transform(spec.transform)
    except MergeCliError as exc:
        raise ValueError(str(exc)) from None
    if spec.augment and not has_random_step(steps):
        raise ValueError(
            "augment: true needs a random step in `transform:` (random_crop with padding, hflip)"
        )


def _hf_options(spec: DataSpec) -> None:
    """An hf_dataset's keys that go together: those of its image or its text input, and task
    lm's (no labels) apart from classification's."""
    if spec.path is None:
        raise ValueError(
            "source 'hf_dataset' needs `path` (a directory written by save_to_disk, or parquet "
            "files)"
        )
    image_keys = [k for k in ("mode", "workers", "transform", "augment") if getattr(spec, k)]
    text_keys = [k for k in ("tokenizer", "seq_len", "max_tokens") if getattr(spec, k)]
    if spec.image is not None and spec.text is not None:
        raise ValueError("give `image` or `text`, not both: one input column")
    if (spec.text is not None or spec.task == "lm") and image_keys:
        raise ValueError(f"a text column takes no {', '.join(image_keys)} (image options)")
    if spec.image is not None and (text_keys or spec.task is not None):
        extra = [*text_keys, *(["task"] if spec.task is not None else [])]
        raise ValueError(f"an image column takes no {', '.join(extra)} (text options)")
    if spec.task == "lm":
        if (
            spec.label is not None
            or spec.classes is not None
            or spec.balanced
            or spec.partition
            or spec.class_fractions
        ):
            raise ValueError(
                "task lm has no labels, so no `label`, `classes`, `partition`, `class_fractions` "
                "or `balanced` "
                "(`fraction` keeps a share of the blocks)"
            )
    elif spec.max_tokens is not None:
        raise ValueError("max_tokens caps the packed blocks of task lm; remove it, or set task: lm")
    _transform_options(spec)


# The keys only source 'text' takes.
TEXT_KEYS = ("tokenizer", "field", "seq_len", "max_tokens", "cache")
# The keys only image sources take.
IMAGE_KEYS = ("root", "labels", "mode", "workers", "transform", "augment")
# The keys only source 'hf_dataset' takes (besides text's and images' own).
HF_KEYS = ("image", "text", "label", "task")
# A name of a set in `data.eval: {name: spec, ...}`.
SET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _eval_form(value: Any) -> str:
    """One set is a mapping with a `source` (or a DataSpec); anything else is named sets."""
    if isinstance(value, DataSpec) or (isinstance(value, dict) and "source" in value):
        return "set"
    return "sets"


# `data.eval`: one set, or several by name (each evaluated and shown apart). The form is
# chosen before validating, so that an error is about that form alone.
EvalSets = Annotated[
    Annotated[DataSpec, Tag("set")] | Annotated[dict[str, DataSpec], Tag("sets")],
    Discriminator(_eval_form),
]


class DataSection(Strict):
    fit: DataSpec | None = None
    eval: EvalSets | None = None

    @field_validator("eval")
    @classmethod
    def _named_sets(
        cls, value: DataSpec | dict[str, DataSpec] | None
    ) -> DataSpec | dict[str, DataSpec] | None:
        if isinstance(value, dict):
            if not value:
                raise ValueError("give at least one named set, or one data spec")
            bad = [name for name in value if not SET_NAME.fullmatch(name)]
            if bad:
                raise ValueError(
                    f"set name {bad[0]!r} is not a plain identifier (letters, digits and _, "
                    "not starting with a digit)"
                )
        specs = value.values() if isinstance(value, dict) else [value] if value else []
        if any(spec.augment for spec in specs):
            raise ValueError("evaluation never augments: remove `augment` from data.eval")
        return value

    def eval_specs(self) -> dict[str, DataSpec]:
        """The eval sets by name: one unnamed set is called ``eval``."""
        if self.eval is None:
            return {}
        return dict(self.eval) if isinstance(self.eval, dict) else {"eval": self.eval}


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
    # At least one, checked when the recipe loads: `align-spec` previews a model without any.
    checkpoints: list[CheckpointSpec] = Field(default_factory=list)
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
        return {self.kind: {"method": self.method, **params}}


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe with its resolved steps, where it came from, and the warnings its
    loading left (deprecated keys), for the command to log."""

    recipe: Recipe
    steps: list[StepSpec]
    source: str
    warnings: list[str] = field(default_factory=list)
    # Where each key stands in the file (a recipe.problems.Locator), for `file:line` messages
    # about the inputs the recipe names; None for recipes built in code.
    where: Any = field(default=None, compare=False, repr=False)

    def at(self, key: tuple[str | int, ...], message: str) -> str:
        """``message`` about recipe key ``key`` as ``file:line: dotted.key: message``."""
        if self.where is not None:
            return self.where(key, message)
        return f"{self.source}: {'.'.join(str(k) for k in key)}: {message}"

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.output.dir or f"out/{self.recipe.name}")

    def resolved(self) -> dict[str, Any]:
        """The recipe with every default filled in (those a step takes from the rest of the
        recipe too) and overrides applied."""
        data = self.recipe.model_dump(mode="json", exclude_none=True)
        data["output"]["dir"] = str(self.output_dir)
        data["steps"] = []
        for step in self.steps:
            resolved = step.as_dict()
            params = resolved[step.kind]
            for key, value in step.params.defaults_used(self.recipe).items():
                if params.get(key) is None:
                    params[key] = value
            data["steps"].append(resolved)
        return data

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False)

    def sha256(self) -> str:
        """What the run computes: the resolved recipe without where it writes (`output.dir`)
        and how it runs (`slurm`), so that neither moving the output nor adding `requeue`
        changes the output's metadata or stops an interrupted run from resuming (its fit
        state lives in the output dir, so another dir never finds it)."""
        resolved = self.resolved()
        resolved.pop("slurm", None)
        resolved["output"].pop("dir", None)
        return hashlib.sha256(yaml.safe_dump(resolved, sort_keys=False).encode()).hexdigest()
