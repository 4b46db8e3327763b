"""The shape of report.json that `mergecli report` renders: every field the renderer reads, with
its type, so that a damaged or foreign file is one line naming what is wrong, not a crash.

Extra fields are allowed (the renderer ignores them); types are strict (``"0.5"`` is not a
number: the renderer formats numbers). A field the renderer reads when present may be absent,
never null: its default is ``Field(default=None)`` on a non-optional type."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    model_validator,
)

from mergecli.errors import MergeCliError

Number = float  # strict mode: an int or a float, never a string or a bool
Numbers = list[float]
Image = list[float]
ClassLabel = Annotated[str, StringConstraints(pattern=r"^-?\d+$")]


class Shape(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class Input(Shape):
    name: str
    path: str
    sha256: str
    role: str | None = None


class Distance(Shape):
    before: Number
    after: Number


class Matching(Shape):
    objective: Number
    restart_objectives: Numbers = Field(min_length=1)
    best_restart: int
    sweeps: int


class Align(Shape):
    method: Any
    reference: Any
    groups: list[Any] | dict[str, Any]
    weight_distance: dict[str, Distance] = {}
    matching: dict[str, Matching] = {}
    from_: str | None = Field(default=None, alias="from")


class Repair(Shape):
    # A user's repair method may write its own entry: only what the renderer formats is typed.
    head: str | None = None
    head_corrected: bool = Field(default=None)


class Stage(Shape):
    steps: Number
    history: list[dict[str, Any]]

    @model_validator(mode="after")
    def _last_accuracy(self) -> Stage:
        last = self.history[-1] if self.history else {}
        if "val_accuracy" in last and type(last["val_accuracy"]) not in (int, float):
            raise ValueError("history[-1].val_accuracy must be a number")
        return self


class Fit(Shape):
    method: Any
    granularity: Any
    multi: Any
    seconds: Number
    examples: Any
    stages: list[Stage] = Field(min_length=1)


class Result(Shape):
    name: Any
    kind: Any
    accuracy: Number
    loss: Number
    ece: Number = Field(default=None)
    delta_vs_best_endpoint: Number | None = None
    delta_vs_ensemble: Number | None = None
    per_class_accuracy: dict[ClassLabel, Number] = {}


class Evaluate(Shape):
    split: Any
    examples: Any
    sets: dict[str, Any] = Field(default=None)  # several named eval sets: a `set` per row
    results: list[Result]


class SetScore(Shape):
    loss: Number
    perplexity: Number


class LanguageModelResult(Shape):
    name: Any
    kind: Any
    sets: dict[str, SetScore]
    mean_perplexity: Number


class TokenSet(Shape):
    tokens: int


class LanguageModelEvaluate(Shape):
    method: Literal["language_model"]
    sets: dict[str, TokenSet] = Field(min_length=1)
    results: list[LanguageModelResult]

    @model_validator(mode="after")
    def _every_set_scored(self) -> LanguageModelEvaluate:
        for row in self.results:
            if set(row.sets) != set(self.sets):
                raise ValueError(f"results: {row.name!r} is not scored on every set")
        return self


TAGS = ("classification", "language_model")


def _evaluate_form(value: Any) -> str:
    return "language_model" if isinstance(value, dict) and "method" in value else "classification"


class Curve(Shape):
    loss: Numbers
    accuracy: Numbers
    loss_barrier: Number
    loss_barrier_midpoint: Number
    accuracy_barrier: Number


class Path_(Shape):
    from_: Any = Field(alias="from")
    to: Any
    fit: Curve = Field(default=None)
    eval: Curve = Field(default=None)


class Interpolation(Shape):
    lambdas: Numbers
    paths: dict[str, Path_] = Field(min_length=1)
    data: dict[str, str] = {}

    @model_validator(mode="after")
    def _curves_span_lambdas(self) -> Interpolation:
        splits = {(path.fit is not None, path.eval is not None) for path in self.paths.values()}
        if len(splits) != 1 or splits == {(False, False)}:
            raise ValueError("paths: every path needs the same curves (fit, eval or both)")
        for name, path in self.paths.items():
            for curve in (path.fit, path.eval):
                if curve and not len(curve.loss) == len(curve.accuracy) == len(self.lambdas):
                    raise ValueError(f"paths.{name}: one loss and accuracy per lambda")
        return self


class Soup(Shape):
    name: str
    kind: str
    accuracy: Number
    loss: Number
    ingredients: list[str] = []


class Averaging(Shape):
    split: Any
    selected_on: str = Field(default=None)
    data: dict[str, str] = {}
    results: list[Soup] = Field(min_length=1)


class Scaled(Shape):
    factor: Number
    apply_to: str
    subject: str
    accuracy: Number
    agreement: Number


class Scaling(Shape):
    split: Any
    rule: str
    models: list[str] = []
    data: dict[str, str] = {}
    results: list[Scaled] = Field(min_length=1)


class Match(Shape):
    class_: Any = Field(alias="class")
    cosine: Number


class TemplateSet(Shape):
    name: str
    kind: str
    images: list[Image]
    match: list[Match]
    mean_cosine: Number


class Pair(Shape):
    other: Any
    mean_cosine_before: Number
    mean_cosine_after: Number = Field(default=None)


class Templates(Shape):
    layer: Any
    model: Any
    split: Any
    data: str = Field(default=None)
    image_shape: list[int] = Field(min_length=1)
    classes: list[Any] = Field(min_length=1)
    class_means: list[Image]
    units: list[Any] = Field(min_length=1)
    per_class: bool = False
    sets: list[TemplateSet] = Field(min_length=1)
    pair: Pair | None = None

    @model_validator(mode="after")
    def _images_fit(self) -> Templates:
        if any(size < 1 for size in self.image_shape):
            raise ValueError("image_shape: sizes must be positive")
        if len(self.classes) != len(self.class_means):
            raise ValueError("one class per class mean")
        if any(len(s.images) != len(self.units) or len(s.match) != len(self.units)
               for s in self.sets):  # fmt: skip
            raise ValueError("sets: one image and one match per unit")
        images = [*self.class_means, *(image for s in self.sets for image in s.images)]
        if any(len(image) != math.prod(self.image_shape) for image in images):
            raise ValueError(f"every image must have {math.prod(self.image_shape)} values")
        return self


class Layer(Shape):
    tensor: str
    count: Any
    mean: Number
    std: Number
    histogram: Numbers


class Coefficients(Shape):
    reference: Any
    multi: Any
    even: Number
    bin_edges: Numbers
    layers: list[Layer] = Field(min_length=1)

    @model_validator(mode="after")
    def _bins(self) -> Coefficients:
        if any(len(layer.histogram) != len(self.bin_edges) - 1 for layer in self.layers):
            raise ValueError("every histogram needs one count per bin (len(bin_edges) - 1)")
        return self


# What `analysis.KIND` holds, per kind; every registered analysis kind has one (tested).
ANALYSES: dict[str, type[Shape]] = {
    "interpolation": Interpolation,
    "averaging_vs_ensembling": Averaging,
    "scaling": Scaling,
    "templates": Templates,
    "coefficients": Coefficients,
}


class Report(Shape):
    inputs: list[Input] = []
    align: Align = Field(default=None)
    repair: Repair = Field(default=None)
    fit: Fit = Field(default=None)
    evaluate: Annotated[
        Annotated[Evaluate, Tag("classification")]
        | Annotated[LanguageModelEvaluate, Tag("language_model")],
        Discriminator(_evaluate_form),
    ] = Field(default=None)
    analysis: dict[str, dict[str, Any]] = {}


def check_report(data: Any, source: str) -> None:
    """Raise a one-line MergeCliError unless ``data`` is a report `mergecli report` can render.

    Analysis kinds must be registered ones: each becomes a file name under analysis/."""
    from mergecli.registry import methods_of

    if not isinstance(data, dict):
        raise MergeCliError(
            f"{source}: expected a JSON object, got a JSON {_json_type(data)}; give the output "
            "dir of a finished `mergecli run`"
        )
    _validate(Report, data, source, "")
    kinds = methods_of("analyze")
    for kind, entry in data.get("analysis", {}).items():
        if kind not in kinds or kind not in ANALYSES:
            # The kind names files under analysis/: never a path from the file itself.
            raise MergeCliError(
                f"{source}: analysis: unknown analysis kind {json.dumps(kind)} (known: "
                f"{', '.join(kinds)}); remove it or re-run the recipe"
            )
        _validate(ANALYSES[kind], entry, source, f"analysis.{kind}.")


def _validate(shape: type[Shape], data: Any, source: str, prefix: str) -> None:
    try:
        shape.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = error["loc"]
        # A tagged union puts its tag (the evaluate method's form) into the location: not a key.
        parts = [p for i, p in enumerate(loc) if not (i and loc[i - 1] == "evaluate" and p in TAGS)]
        where = prefix + ".".join(str(part) for part in parts)
        message = error["msg"].removeprefix("Value error, ")
        raise MergeCliError(
            f"{source}: {where.rstrip('.') or '(top level)'}: {message[0].lower()}{message[1:]}"
            "; the file is not a report written by `mergecli run` (re-run the recipe to write "
            "it again)"
        ) from None


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")
