"""Turn a recipe's ``model.arch`` + ``model.args`` into an ``nn.Module``: built-ins or user code."""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from mergecli.errors import MergeCliError, one_line
from mergecli.models.hf import HF_ARCH, hf
from mergecli.models.loading import allow_tied_absent
from mergecli.models.mlp import mlp
from mergecli.models.resnet import resnet20
from mergecli.models.vgg import vgg
from mergecli.models.vit import vit
from mergecli.user_code import import_object

_BUILTINS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "vgg": vgg,
    "resnet20": resnet20,
    "vit": vit,
    HF_ARCH: hf,
}


def builtin_architectures() -> dict[str, Callable[..., nn.Module]]:
    """Built-in architecture names mapped to their (keyword-only) factories."""
    return dict(_BUILTINS)


def build_model(
    arch: str, args: dict[str, Any] | None = None, model_dir: str | Path | None = None
) -> nn.Module:
    """Build a built-in architecture or a user ``package.module:factory`` with ``**args``.

    ``model_dir`` is the reference checkpoint's directory, where ``hf`` reads config.json
    unless ``args`` names another (``config``)."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise MergeCliError(
            f"model.args: expected a mapping of keyword arguments, got {type(args).__name__}; "
            f"write model.args as 'name: value' lines"
        )
    if not isinstance(arch, str) or not arch.strip():
        raise MergeCliError(
            f"model.arch: expected a built-in name ({_builtin_list()}) or "
            f"'package.module:factory', got {arch!r}"
        )
    arch = arch.strip()
    if ":" in arch:
        module = _call(arch, _user_factory(arch), args, user=True)
    elif arch not in _BUILTINS:
        raise MergeCliError(_unknown_builtin_message(arch))
    else:
        if arch == HF_ARCH and model_dir is not None and "config" not in args:
            args = {"config": str(model_dir), **args}
        module = _call(arch, _BUILTINS[arch], args, user=False)
    return allow_tied_absent(module)


def argument_names(arch: str) -> list[str]:
    """The keyword arguments ``arch``'s factory takes (none known: an empty list)."""
    arch = arch.strip()
    if ":" in arch:
        factory = _user_factory(arch)
    elif arch in _BUILTINS:
        factory = _BUILTINS[arch]
    else:
        return []
    return _parameter_names(factory) or []


def _builtin_list() -> str:
    return ", ".join(_BUILTINS)


def _unknown_builtin_message(arch: str) -> str:
    close = difflib.get_close_matches(arch.lower(), list(_BUILTINS), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    variant = re.fullmatch(r"vgg[-_]?(\d+)", arch.lower())
    if variant:
        hint = f"use model.arch 'vgg' with model.args.variant: {variant.group(1)}; "
    if "." in arch:
        # "pkg.module.factory" is a common slip for "pkg.module:factory".
        module, _, name = arch.rpartition(".")
        hint += f"for your own code write '{module}:{name}'; "
    return (
        f"model.arch: unknown architecture '{arch}'; {hint}built-ins are: {_builtin_list()} "
        f"(or use 'package.module:factory' for your own model)"
    )


def _user_factory(arch: str) -> Callable[..., Any]:
    """The callable that ``package.module:factory`` names (the current directory importable)."""
    factory = import_object(
        arch, "model.arch", form="package.module:factory", example="mymodels:tiny_cnn"
    )
    if not callable(factory):
        raise MergeCliError(
            f"model.arch '{arch}': '{arch.partition(':')[2].strip()}' is a "
            f"{type(factory).__name__}, not a function or class; point model.arch at a "
            f"function that returns an nn.Module"
        )
    return factory


def _parameter_names(factory: Callable[..., Any]) -> list[str] | None:
    """Keyword parameter names of ``factory``, or None when unknown / it takes **kwargs."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]


def _bad_args_message(
    label: str, name: str, factory: Callable[..., Any], args: dict[str, Any], reason: str
) -> str:
    allowed = _parameter_names(factory)
    message = f"model.args: {name}() {reason}"
    if allowed is not None:
        for key in args:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.7)
                if close:
                    message += f" (did you mean '{close[0]}'?)"
                break
        message += f"; {label} accepts: {', '.join(allowed) if allowed else 'no arguments'}"
    return message


def _call(arch: str, factory: Callable[..., Any], args: dict[str, Any], user: bool) -> nn.Module:
    """Call ``factory(**args)``, turning bad arguments and bad return values into one line."""
    name = getattr(factory, "__name__", arch.rpartition(":")[2])
    label = f"'{arch}'"
    bad_keys = [key for key in args if not isinstance(key, str)]
    if bad_keys:
        raise MergeCliError(
            f"model.args: argument names must be strings, got {bad_keys[0]!r}; "
            f"write model.args as 'name: value' lines"
        )
    # Check the arguments against the signature first, so a TypeError raised *inside* a
    # factory (a bug there) is not mistaken for a wrong argument name.
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    args_checked = False
    if signature is not None:
        try:
            signature.bind(**args)
        except TypeError as exc:
            raise MergeCliError(
                _bad_args_message(label, name, factory, args, one_line(exc))
            ) from exc
        args_checked = _parameter_names(factory) is not None
    try:
        model = factory(**args)
    except MergeCliError:
        raise
    except TypeError as exc:
        if not user:
            raise
        if args_checked:
            # The names fit the signature, so this TypeError comes from inside the factory.
            raise MergeCliError(
                f"model.arch '{arch}': the factory raised TypeError: {one_line(exc)}; "
                f"fix the factory or the values in model.args"
            ) from exc
        reason = one_line(exc)
        # Python prefixes the function name itself (`tiny() got ...`); avoid `tiny() tiny() ...`.
        reason = re.sub(rf"^{re.escape(name)}\(\)\s*", "", reason)
        raise MergeCliError(_bad_args_message(label, name, factory, args, reason)) from exc
    except Exception as exc:
        if not user:
            raise
        raise MergeCliError(
            f"model.arch '{arch}': the factory raised {type(exc).__name__}: {one_line(exc)}; "
            f"fix the factory or the values in model.args"
        ) from exc
    if not isinstance(model, nn.Module):
        raise MergeCliError(
            f"model.arch '{arch}': {name}() returned {type(model).__name__}, "
            f"not a torch.nn.Module; make the factory return the model instance"
        )
    return model
