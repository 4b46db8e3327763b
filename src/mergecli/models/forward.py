"""Calling a model on a batch and reading its logits, whatever the model returns.

Image classifiers return a tensor; Hugging Face models return a ``ModelOutput`` (a dict with
attributes) and take token ids with an attention mask; other models return a tuple whose first
element is the logits. Every step that runs a model goes through these functions, so that each
of those shapes works on every path (fit, evaluate, repair, alignment's self-check).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mergecli.data.batches import TokenBatch
from mergecli.errors import MergeCliError

Batch = Tensor | TokenBatch
__all__ = [
    "Batch",
    "TokenBatch",
    "call_model",
    "functional_logits",
    "is_token_input",
    "logits_from",
    "model_arguments",
    "model_logits",
]


def model_arguments(x: Batch) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """The positional and keyword arguments a model is called with for the batch ``x``."""
    if isinstance(x, TokenBatch):
        return (x.ids,), {"attention_mask": x.mask}
    return (x,), {}


def call_model(module: nn.Module, x: Batch) -> Any:
    """The model's raw outputs on ``x`` (for forward hooks that read inner activations)."""
    args, kwargs = model_arguments(x)
    return module(*args, **kwargs)


def logits_from(outputs: Any) -> Tensor:
    """A model's outputs as one logits tensor: a tensor as it is, ``.logits`` of a
    ``ModelOutput`` or a dict, the first element of a tuple or list."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if isinstance(logits, Tensor):
        return logits
    raise MergeCliError(
        f"the model returned {type(outputs).__name__}, which holds no logits tensor; mergecli "
        "reads a tensor, a `.logits` attribute or key, or the first element of a tuple: make "
        "the model's forward return one of those"
    )


def model_logits(module: nn.Module, x: Batch) -> Tensor:
    """The logits of ``module`` on the batch ``x``."""
    return logits_from(call_model(module, x))


def functional_logits(module: nn.Module, weights: dict[str, Tensor], x: Batch) -> Tensor:
    """The logits of ``module`` with ``weights`` in place of its own tensors, on ``x``."""
    args, kwargs = model_arguments(x)
    return logits_from(torch.func.functional_call(module, weights, args, kwargs))


def is_token_input(x: Batch) -> bool:
    """Whether the batch holds token ids (integers) rather than real-valued inputs."""
    ids = x.ids if isinstance(x, TokenBatch) else x
    return not ids.is_floating_point() and not ids.is_complex()
