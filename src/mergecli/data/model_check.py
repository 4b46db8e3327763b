"""Where data first meets the model: its inputs must fit the model and its labels must be
classes the model has. Checked once per source, so that no step (align, fit, evaluate,
repair, analyze, train) finds out in the middle of a torch call."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mergecli.data.batches import TensorData
from mergecli.errors import MergeCliError, describe
from mergecli.models.forward import model_logits


@dataclass(frozen=True)
class DataUse:
    """What messages say about the data and the model: ``where`` (e.g. ``data.fit``), the
    source in words, the model's name and its declared input shape (if any)."""

    where: str
    source: str
    model: str
    input_shape: Sequence[int] | None = None
    # The model factory's argument names, and how the user sets one (a recipe's key or
    # train's option), to say which argument makes the model take the data.
    arg_names: Sequence[str] = ()
    arg_form: str = "model.args.{name}: {value}"


def check_against_model(data: TensorData, module: nn.Module, use: DataUse) -> None:
    """Run ``module`` on the first two examples; refuse inputs it cannot take and labels
    beyond its outputs (token ids beyond its vocabulary and sequences beyond its positions
    first, checked over all the data). The module is put in eval mode (batch norm on two rows)."""
    if not data.x.is_floating_point() and data.x.dim() == 2:
        _check_positions(int(data.x.shape[1]), module, use)
        _check_token_ids(data, module, use)
    outputs = _probe(data, module, use)
    if isinstance(outputs, Tensor) and outputs.dim() == 2:
        _check_labels(data, int(outputs.shape[1]), use)


def check_shape_against_model(
    shape: Sequence[int],
    build: Callable[[], nn.Module],
    use: DataUse,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Inputs of ``shape`` (one example) and ``dtype`` must go through the model: tried on the
    model built on the meta device (no weights, no arithmetic); only when that fails is a real
    model run on zeros, which tells a misfit from an operation the meta device does not have.
    Sequences of token ids must also fit the model's positions."""
    tokens = not dtype.is_floating_point and len(shape) == 1
    try:
        with torch.device("meta"):
            module = build()
    except Exception:  # noqa: BLE001 - built for real below, where a real problem raises
        module = None
    if module is not None:
        if tokens:
            _check_positions(int(shape[0]), module, use)
        try:
            module.eval()
            with torch.no_grad():
                model_logits(module, torch.zeros(2, *shape, device="meta", dtype=dtype))
            return
        except Exception:  # noqa: S110 - confirmed or cleared on a real model below
            pass
    real = build()
    if tokens:
        _check_positions(int(shape[0]), real, use)
    zeros = TensorData(torch.zeros(2, *shape, dtype=dtype), torch.zeros(2, dtype=torch.int64))
    _probe(zeros, real, use)


def _subject(use: DataUse) -> str:
    subject = f"{use.where} ({use.source})" if use.where and use.source else use.where or use.source
    return subject + ": " if subject else ""


def _check_positions(length: int, module: nn.Module, use: DataUse) -> None:
    """Sequences no longer than the model's positions (``config.max_position_embeddings``,
    where the model has a config saying it)."""
    positions = getattr(getattr(module, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and length > positions:
        raise MergeCliError(
            f"{_subject(use)}sequences of {length} tokens are longer than model {use.model} "
            f"takes (config.max_position_embeddings {positions}); set seq_len to at most "
            f"{positions} (or give shorter sequences)"
        )


def _input_embedding(module: nn.Module) -> nn.Embedding | None:
    """The token embedding: the model's own (``get_input_embeddings``, as Hugging Face models
    have), else its only nn.Embedding (with several, which one embeds tokens is unknown)."""
    getter = getattr(module, "get_input_embeddings", None)
    if callable(getter):
        try:
            embedding = getter()
        except Exception:  # noqa: BLE001 - a model without one raises NotImplementedError
            embedding = None
        if isinstance(embedding, nn.Embedding):
            return embedding
    embeddings = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    return embeddings[0] if len(embeddings) == 1 else None


def _check_token_ids(data: TensorData, module: nn.Module, use: DataUse) -> None:
    """Token ids must be rows of the model's token embedding (and not negative)."""
    embedding = _input_embedding(module)
    if embedding is None:
        return
    vocabulary = embedding.num_embeddings
    bad = (data.x >= vocabulary) | (data.x < 0)
    rows = torch.nonzero(bad.any(dim=1)).flatten()
    if len(rows) == 0:
        return
    row = int(rows[0])
    token = int(data.x[row][bad[row]][0])
    raise MergeCliError(
        f"{_subject(use)}token id {token} in row {data.source_row(row)} is not in the "
        f"vocabulary of model {use.model}, which embeds {vocabulary} tokens (ids 0.."
        f"{vocabulary - 1}; {len(rows)} row(s) with such ids); tokenize with the model's own "
        "tokenizer"
    )


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
        return model_logits(module, data.inputs(slice(0, 2)).to(device))
    except Exception as exc:  # torch raises RuntimeError, user models anything
        layer = entered[-1] if entered else None
        first = len(entered) == 1  # the model's first layer refused the inputs
        raise MergeCliError(_shape_message(data, use, layer, exc, first)) from exc
    finally:
        for hook in hooks:
            hook.remove()


def _shape_message(
    data: TensorData,
    use: DataUse,
    layer: tuple[str, nn.Module] | None,
    exc: Exception,
    first: bool,
) -> str:
    """One line: the source, the given and expected shapes, the failing layer, what to do."""
    given = list(data.x.shape[1:])
    expected = (
        f", which takes inputs of shape {list(use.input_shape)} (model.input_shape)"
        if use.input_shape
        else ""
    )
    at = f" at {_describe_layer(*layer)}" if layer is not None else ""
    fix = _argument_fix(given, use, layer) if first else None
    return (
        f"{_subject(use)}inputs of shape {given} per example do not fit model "
        f"{use.model}{expected}; it fails{at} ({describe(exc)}); "
        + (f"set {fix} for these inputs, or " if fix else "")
        + "give inputs of the shape the model takes"
    )


def _argument_fix(
    given: list[int], use: DataUse, layer: tuple[str, nn.Module] | None
) -> str | None:
    """The model argument that makes the failing first layer take ``given`` inputs, written
    as the user sets it (e.g. ``--arg in_channels=1``), if the factory has one."""
    if layer is None:
        return None
    module = layer[1]
    conv = isinstance(module, nn.modules.conv._ConvNd)
    if conv and "in_channels" in use.arg_names and given and given[0] != module.in_channels:
        return use.arg_form.format(name="in_channels", value=given[0])
    if isinstance(module, nn.Linear) and "in_features" in use.arg_names:
        features = math.prod(given)
        if features != module.in_features:
            return use.arg_form.format(name="in_features", value=features)
    return None


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
