"""Where data first meets the model: its inputs must fit the model and its labels must be
classes the model has. Checked once per source, so that no step (align, fit, evaluate,
repair, analyze, train) finds out in the middle of a torch call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mergecli.data.batches import TensorData
from mergecli.errors import MergeCliError, describe


@dataclass(frozen=True)
class DataUse:
    """What messages say about the data and the model: ``where`` (e.g. ``data.fit``), the
    source in words, the model's name and its declared input shape (if any)."""

    where: str
    source: str
    model: str
    input_shape: Sequence[int] | None = None


def check_against_model(data: TensorData, module: nn.Module, use: DataUse) -> None:
    """Run ``module`` on the first two examples; refuse inputs it cannot take and labels
    beyond its outputs. The module is put in eval mode (batch norm on two rows)."""
    outputs = _probe(data, module, use)
    if isinstance(outputs, Tensor) and outputs.dim() == 2:
        _check_labels(data, int(outputs.shape[1]), use)


@torch.no_grad()
def _probe(data: TensorData, module: nn.Module, use: DataUse) -> object:
    """The module's outputs on a small batch, or one line naming the layer that refused it."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    entered: list[tuple[str, nn.Module]] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, _args, name=name: entered.append((name, mod)))
        for name, m in module.named_modules()
        if not list(m.children())  # leaves: the layer that raised is the last one entered
    ]
    module.eval()
    try:
        return module(data.x[:2].to(device))
    except Exception as exc:  # torch raises RuntimeError, user models anything
        layer = entered[-1] if entered else None
        raise MergeCliError(_shape_message(data, use, layer, exc)) from exc
    finally:
        for hook in hooks:
            hook.remove()


def _shape_message(
    data: TensorData, use: DataUse, layer: tuple[str, nn.Module] | None, exc: Exception
) -> str:
    """One line: the source, the given and expected shapes, the failing layer, what to do."""
    given = list(data.x.shape[1:])
    expected = (
        f", which takes inputs of shape {list(use.input_shape)} (model.input_shape)"
        if use.input_shape
        else ""
    )
    at = f" at {_describe_layer(*layer)}" if layer is not None else ""
    return (
        f"{use.where} ({use.source}): inputs of shape {given} per example do not fit model "
        f"{use.model}{expected}; it fails{at} ({describe(exc)}); give inputs of the shape "
        "the model takes"
    )


def _describe_layer(name: str, layer: nn.Module) -> str:
    """A layer and, for the usual first layers, the input width it expects."""
    kind = type(layer).__name__
    name = name or "(the whole model)"
    if isinstance(layer, nn.Linear):
        return f"layer {name} ({kind}), which takes {layer.in_features} features"
    if isinstance(layer, nn.modules.conv._ConvNd):
        return f"layer {name} ({kind}), which takes {layer.in_channels} channels"
    return f"layer {name} ({kind})"


def _check_labels(data: TensorData, classes: int, use: DataUse) -> None:
    """Labels must index the model's outputs (negative ones are refused at load)."""
    beyond = torch.nonzero(data.y >= classes).flatten()
    if len(beyond) == 0:
        return
    first = int(beyond[0])
    raise MergeCliError(
        f"{use.where} ({use.source}): label {int(data.y[first])} in row "
        f"{data.source_row(first)} is not a class of model {use.model}, which has {classes} "
        f"outputs (labels 0..{classes - 1}; {len(beyond)} row(s) beyond); fix the labels or "
        "leave those classes out with the data's `classes:` option"
    )
