"""Activation checkpointing for the fit: each layer's activations recomputed in the backward
pass instead of kept (Chen et al., 2016), so the fit holds one layer's activations at a time."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

_ENABLED = "_mergecli_checkpointing"


def enable_checkpointing(module: nn.Module) -> None:
    """Checkpoint the module's layers: a Hugging Face model (the module, or the first one
    inside it) by its own mechanism (its decoder or encoder layers), any other module block by
    block (the members of every ModuleList, or its children when it has none). Idempotent."""
    if getattr(module, _ENABLED, False):
        return
    hugging_face = next(
        (
            m
            for m in module.modules()
            if getattr(m, "supports_gradient_checkpointing", False)
            and hasattr(m, "gradient_checkpointing_enable")
        ),
        None,
    )
    if hugging_face is not None:
        _enable_hugging_face(hugging_face)
    else:
        lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
        blocks = [b for m in lists for b in m] if lists else list(module.children())
        for block in blocks:
            block.forward = _checkpointed(block.forward)
    object.__setattr__(module, _ENABLED, True)


def _enable_hugging_face(module: nn.Module) -> None:
    options = {"use_reentrant": False}  # the reentrant variant drops gradients of weights
    if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        # A layer recomputed in the backward would write its keys and values to the cache twice.
        config.use_cache = False
    # transformers checkpoints a layer only in training mode, and the fit runs the model in
    # eval mode (no dropout): the checkpointed layers alone are marked training. Their
    # submodules (dropout, attention) keep their own eval flag, which is what they read.
    for layer in module.modules():
        if getattr(layer, "gradient_checkpointing", False) and _is_layer(layer):
            layer.training = True


def _is_layer(module: nn.Module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers: every module that carries the flag
        return True
    return isinstance(module, GradientCheckpointingLayer)


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # no backward to recompute for
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextmanager
def bind(module: nn.Module, weights: Mapping[str, Tensor]) -> Iterator[None]:
    """The module's parameters and buffers replaced by ``weights`` until the context exits, as
    ``torch.func.functional_call`` does for one call (tied weights follow, as there); a
    checkpointed backward must run inside, since it recomputes layers from these attributes."""
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(module, dict(weights), tie_weights=True):
        yield
