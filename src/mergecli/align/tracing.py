"""Tracing a model to its torch.fx graph, going inside torch's transformer layers."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from mergecli.errors import MergeCliError


class _Tracer(fx.Tracer):
    """fx's tracer, which also goes inside torch's transformer encoder layers, and keeps the
    submodules named in ``opaque`` whole.

    Transformer layers' own forward checks the input to choose a fused fast path, which
    symbolic tracing cannot follow; the plain path below computes the same function from their
    submodules. When tracing fails, ``failed`` names the innermost submodule being traced.
    """

    def __init__(self, opaque: set[str]) -> None:
        super().__init__()
        self.opaque = opaque
        self.failed: tuple[str, Exception] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.opaque or super().is_leaf_module(
            m, module_qualified_name
        )

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            plain = _PLAIN_FORWARDS.get(type(m))
            if plain is not None and self.path_of_module(m) not in self.opaque:
                return plain(m, *args, **kwargs)
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if self.failed is None:
                self.failed = (self.path_of_module(m), exc)
            raise


def _encoder_layer(
    layer: nn.TransformerEncoderLayer,
    src: Any,
    src_mask: Any = None,
    src_key_padding_mask: Any = None,
    is_causal: bool = False,
) -> Any:
    def attend(x: Any) -> Any:
        out = layer.self_attn(
            x, x, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
            need_weights=False, is_causal=is_causal,
        )[0]  # fmt: skip
        return layer.dropout1(out)

    def feed_forward(x: Any) -> Any:
        hidden = layer.dropout(layer.activation(layer.linear1(x)))
        return layer.dropout2(layer.linear2(hidden))

    x = src
    if layer.norm_first:
        x = x + attend(layer.norm1(x))
        return x + feed_forward(layer.norm2(x))
    x = layer.norm1(x + attend(x))
    return layer.norm2(x + feed_forward(x))


def _encoder(
    encoder: nn.TransformerEncoder,
    src: Any,
    mask: Any = None,
    src_key_padding_mask: Any = None,
    is_causal: bool | None = None,
) -> Any:
    x = src
    for layer in encoder.layers:
        x = layer(
            x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal)
        )
    return x if encoder.norm is None else encoder.norm(x)


_PLAIN_FORWARDS = {nn.TransformerEncoderLayer: _encoder_layer, nn.TransformerEncoder: _encoder}


def _defaults_after_input(module: nn.Module) -> dict[str, Any]:
    """The forward's optional arguments after the input (an attention mask, flags) at their
    defaults: mergecli calls the model with its input alone, so the graph is traced that way
    rather than with a proxy that an ``if mask is None`` would take for a tensor."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        p.name: p.default
        for p in parameters
        if p.kind in kinds and p.default is not inspect.Parameter.empty
    }


def trace(module: nn.Module) -> fx.GraphModule:
    """The module's graph (torch.fx); a submodule fx cannot trace is kept whole, and named with
    the reason in ``graph_module.meta["untraceable"]``. The model's own forward must trace."""
    untraceable: dict[str, str] = {}
    while True:
        tracer = _Tracer(set(untraceable))
        try:
            graph = tracer.trace(module, concrete_args=_defaults_after_input(module))
        except Exception as exc:
            if tracer.failed is None or tracer.failed[0] in untraceable:
                reason = " ".join(str(exc).split())[:300]
                raise MergeCliError(
                    f"model {type(module).__name__}: torch.fx cannot trace it "
                    f"({type(exc).__name__}: {reason}); alignment needs a traceable forward "
                    "(no Python control flow on tensor values or shapes), or give the "
                    "checkpoints already aligned"
                ) from None
            name, error = tracer.failed
            untraceable[name] = " ".join(f"{type(error).__name__}: {error}".split())[:160]
            continue
        graph_module = fx.GraphModule(tracer.root, graph, type(module).__name__)
        graph_module.meta["untraceable"] = untraceable
        return graph_module


def export_graph(module: nn.Module, example_input: Any) -> fx.GraphModule:
    """The module's ATen graph from ``torch.export`` (non-strict), shapes specialised on
    ``example_input``, with its parameters as ``get_attr`` nodes under their state-dict names.

    Hugging Face models are exported without their key/value cache (``use_cache=False``), whose
    cache object export cannot return. Raises whatever export raises.
    """
    kwargs: dict[str, Any] = {}
    try:
        if "use_cache" in inspect.signature(module.forward).parameters:
            kwargs["use_cache"] = False
    except (TypeError, ValueError):
        pass
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (example_input,), kwargs=kwargs, strict=False)
    finally:
        module.train(was_training)
    graph_module = program.module()
    graph_module.meta["module"] = module
    return graph_module
