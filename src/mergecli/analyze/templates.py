"""The rows of a linear layer seen as images ("templates"), and what averaging does to them.

Wang et al. (2024, arXiv 2411.09263, section 3) read a linear classifier's rows as class
templates, and weight averaging as averaging those templates. This analysis draws, for the
recipe's reference model and the first other one, the rows of one layer, their average, and
(after `align`) the other's aligned rows and the aligned average, beside the centred class
means (each class mean minus the mean of all examples: uncentred means share one background
that dominates every cosine). A classifier's rows are paired with their classes; other rows
(a deeper model's first layer) with the centred class mean they are most similar to (cosine).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from mergecli.analyze.scoring import Split, available_splits, describe_data, model_head
from mergecli.errors import MergeCliError
from mergecli.recipe.schema import StepParams
from mergecli.registry import step_method
from mergecli.runtime.log import Column, fixed
from mergecli.state import MergeState


class TemplatesParams(StepParams):
    layer: str | None = None  # a 2-D weight; default: the first whose rows fit image_shape
    image_shape: list[int] | None = None  # default: the shape of one input example
    units: int = Field(default=12, ge=1)  # rows shown: the reference's largest in norm
    split: Split = "fit"  # where the class means come from (falls back to the other split)


@step_method("analyze", "templates", TemplatesParams, needs=("model", "data"))
def analyze_templates(state: MergeState, params: TemplatesParams) -> None:
    """Weight rows as images, their averages, and their cosines to the centred class means."""
    splits = available_splits(state)
    split = params.split if params.split in splits else splits[0]
    data = state.data(split)
    shape = params.image_shape or _image_shape(data.x.shape[1:])
    pixels = math.prod(shape)
    reference = state.reference
    layer = params.layer or _first_fitting_layer(reference.tensors, pixels, state)
    if layer not in reference.tensors:
        raise MergeCliError(f"analyze templates: layer '{layer}' is not a tensor of the model")
    weight = reference.tensors[layer].float()
    if weight.dim() != 2 or weight.shape[1] != pixels:
        raise MergeCliError(
            f"analyze templates: the rows of '{layer}' (shape {list(weight.shape)}) cannot be "
            f"shown as {shape} images ({pixels} values each); set `image_shape` or `layer`"
        )
    x = data.features().reshape(len(data), -1).float()
    if x.shape[1] != pixels:
        raise MergeCliError(
            f"analyze templates: inputs have {x.shape[1]} values, image_shape {shape} has "
            f"{pixels}; the class means must be images of the same shape"
        )
    classes = torch.unique(data.y).tolist()
    means = centred_class_means(x, data.y, classes)
    head_name, _ = model_head(state.build_module())
    per_class = layer == f"{head_name}.weight" and weight.shape[0] == len(classes)
    shown = (
        list(range(len(classes)))
        if per_class
        else weight.norm(dim=1).argsort(descending=True)[: params.units].sort().values.tolist()
    )
    sets = [(reference.name, "model", weight)]
    other = next((c for c in state.models if c is not reference), None)
    pair: dict = {}
    if other is not None:
        theirs = other.tensors[layer].float()
        sets += [(other.name, "model", theirs), ("average", "average", (weight + theirs) / 2)]
        pair = {"other": other.name, "mean_cosine_before": _row_cosine(weight, theirs)}
        if other.aligned is not None:
            aligned = other.aligned[layer].float()
            sets += [(f"{other.name} aligned", "aligned", aligned),
                     ("aligned average", "aligned_average", (weight + aligned) / 2)]  # fmt: skip
            pair["mean_cosine_after"] = _row_cosine(weight, aligned)
    result: dict = {
        "layer": layer, "image_shape": list(shape), "split": split,
        "data": describe_data(getattr(state.loaded.recipe.data, split)), "classes": classes,
        "model": reference.name, "per_class": per_class, "units": shown,
        "class_means": _rounded(means),
        "sets": [_template_set(name, kind, rows[shown], means, classes, per_class)
                 for name, kind, rows in sets],
    }  # fmt: skip
    if pair:
        result["pair"] = pair
    state.report.setdefault("analysis", {})["templates"] = result
    state.log.table(
        f"templates: {len(shown)} rows of {layer} against the centred class means",
        [
            Column("rows of", "rows_of", name=True),
            Column("mean cosine to their class", "mean_cosine", fixed(3)),
        ],
        [[s["name"], s["mean_cosine"]] for s in result["sets"]],
    )


def centred_class_means(x: Tensor, y: Tensor, classes: list[int]) -> Tensor:
    """Each class's mean input minus the mean of all inputs: (classes, pixels)."""
    return torch.stack([x[y == c].mean(0) for c in classes]) - x.mean(0)


def match_classes(rows: Tensor, means: Tensor, per_class: bool) -> tuple[Tensor, Tensor]:
    """Each row's class (its own for a classifier, else the most similar mean) and cosine."""
    similarity = F.normalize(rows.float(), dim=1) @ F.normalize(means.float(), dim=1).T
    if per_class:
        index = torch.arange(len(rows))
        return index, similarity[index, index]
    return similarity.max(dim=1).indices, similarity.max(dim=1).values


def _template_set(
    name: str, kind: str, rows: Tensor, means: Tensor, classes: list[int], per_class: bool
) -> dict:
    index, cosine = match_classes(rows, means, per_class)
    return {"name": name, "kind": kind, "images": _rounded(rows),
            "match": [{"class": classes[int(i)], "cosine": float(c)}
                      for i, c in zip(index, cosine, strict=True)],
            "mean_cosine": float(cosine.mean())}  # fmt: skip


def _image_shape(example: torch.Size) -> list[int]:
    dims = [d for d in example if d != 1]  # a single channel is drawn as a plain image
    return dims if len(dims) in (1, 2) else list(example)


def _first_fitting_layer(tensors: dict[str, Tensor], pixels: int, state: MergeState) -> str:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.dim() == 2 and tensor.shape[1] == pixels:
            return name
    raise MergeCliError(
        f"{state.loaded.source}: analyze templates: no 2-D weight has rows of {pixels} values "
        "(one input example); set `layer` and `image_shape`"
    )


def _row_cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=1).mean())


def _rounded(t: Tensor) -> list:
    return (t.float() * 1e4).round().div(1e4).tolist()
