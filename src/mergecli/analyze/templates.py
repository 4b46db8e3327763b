"""The rows of a linear layer seen as images ("templates"), beside the data's class means.

A first-layer unit of an MLP responds to the input pattern its weight row draws; on MNIST those
rows look like pen strokes, and a linear classifier's rows like the digits themselves. The
cosine similarity of each row to the class means says which class a row looks like; for two
models, the mean cosine of matching rows before and after alignment shows what alignment did.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from mergecli.analyze.scoring import Split, available_splits
from mergecli.errors import MergeCliError
from mergecli.recipe.schema import StepParams
from mergecli.registry import step_method
from mergecli.state import MergeState


class TemplatesParams(StepParams):
    layer: str | None = None  # a 2-D weight; default: the first whose rows fit image_shape
    image_shape: list[int] | None = None  # default: the shape of one input example
    units: int = Field(default=16, ge=1)  # how many rows to show (the largest in norm)
    split: Split = "fit"  # where the class means come from (falls back to the other split)


@step_method("analyze", "templates", TemplatesParams, needs=("model", "data"))
def analyze_templates(state: MergeState, params: TemplatesParams) -> None:
    """Weight rows as images, the class means, and their cosine similarities."""
    splits = available_splits(state)
    split = params.split if params.split in splits else splits[0]
    data = state.data(split)
    shape = params.image_shape or _image_shape(data.x.shape[1:])
    pixels = math.prod(shape)
    reference = state.models[0].tensors
    layer = params.layer or _first_fitting_layer(reference, pixels, state)
    if layer not in reference:
        raise MergeCliError(f"analyze templates: layer '{layer}' is not a tensor of the model")
    weight = reference[layer].float()
    if weight.dim() != 2 or weight.shape[1] != pixels:
        raise MergeCliError(
            f"analyze templates: the rows of '{layer}' (shape {list(weight.shape)}) cannot be "
            f"shown as {shape} images ({pixels} values each); set `image_shape` or `layer`"
        )
    x = data.x.reshape(len(data), -1).float()
    if x.shape[1] != pixels:
        raise MergeCliError(
            f"analyze templates: inputs have {x.shape[1]} values, image_shape {shape} has "
            f"{pixels}; the class means must be images of the same shape"
        )
    classes = torch.unique(data.y).tolist()
    means = torch.stack([x[data.y == c].mean(0) for c in classes])
    similarity = F.normalize(weight, dim=1) @ F.normalize(means, dim=1).T  # (rows, classes)
    per_class = weight.shape[0] == len(classes)  # a classifier's rows belong to the classes
    shown = (
        list(range(len(classes)))
        if per_class
        else weight.norm(dim=1).argsort(descending=True)[: params.units].sort().values.tolist()
    )
    rows = []
    for unit in shown:
        match = unit if per_class else int(similarity[unit].argmax())
        rows.append({"unit": unit, "class": classes[match],
                     "cosine": float(similarity[unit, match])})  # fmt: skip
    result: dict = {
        "layer": layer, "image_shape": list(shape), "split": split, "classes": classes,
        "model": state.models[0].name, "rows": rows,
        "templates": _rounded(weight[shown]), "class_means": _rounded(means),
    }  # fmt: skip
    if len(state.models) > 1:
        other = state.models[1]
        theirs = other.tensors[layer].float()
        result["pair"] = {
            "other": other.name,
            "mean_cosine_before": _row_cosine(weight, theirs),
            "other_templates": _rounded(theirs[shown]),
        }
        if other.aligned is not None:
            result["pair"]["mean_cosine_after"] = _row_cosine(weight, other.aligned[layer])
            result["pair"]["aligned_templates"] = _rounded(other.aligned[layer].float()[shown])
    state.report.setdefault("analysis", {})["templates"] = result
    pair = result.get("pair", {})
    state.log.info(
        f"analyze templates: {layer}, {len(shown)} rows",
        mean_cosine_before=round(pair["mean_cosine_before"], 3) if pair else None,
        mean_cosine_after=round(pair["mean_cosine_after"], 3)
        if "mean_cosine_after" in pair
        else None,
    )


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
