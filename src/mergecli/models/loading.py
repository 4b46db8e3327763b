"""Load a state dict into a model, reporting every mismatch at once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mergecli.errors import MergeCliError

MAX_PROBLEMS = 10


def _shape(shape: torch.Size | tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _strip_hint(missing: list[str], unexpected: list[str]) -> str:
    """Suggest a fix when the checkpoint's keys carry an extra prefix such as 'module.'."""
    if not missing or not unexpected:
        return ""
    prefixes = {key.split(".", 1)[0] for key in unexpected}
    if len(prefixes) != 1 or not all("." in key for key in unexpected):
        return ""
    prefix = prefixes.pop() + "."
    if set(missing) <= {key[len(prefix) :] for key in unexpected}:
        return f" (the checkpoint's keys carry an extra '{prefix}' prefix; strip it when saving)"
    return ""


RECIPE_FIX = "check that model.arch and model.args match the checkpoint"


def tied_names(module: nn.Module) -> dict[str, list[str]]:
    """Each name of a parameter that the module shares under several names (tied weights, such
    as a language model's output layer and its token embeddings), mapped to all of them."""
    names: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return {name: group for group in names.values() if len(group) > 1 for name in group}


def allow_tied_absent(module: nn.Module) -> nn.Module:
    """Let ``module.load_state_dict(..., strict=True)`` take a state dict that holds a tied
    parameter under one of its names only: transformers' save_pretrained writes the token
    embeddings and leaves out the output layer tied to them, and loading fills both anyway."""
    tied = tied_names(module)
    if not tied:
        return module

    def drop_tied(_module: nn.Module, incompatible: Any) -> None:
        missing = set(incompatible.missing_keys)
        for name, group in tied.items():
            if name in missing and not all(other in missing for other in group):
                incompatible.missing_keys.remove(name)

    module.register_load_state_dict_post_hook(drop_tied)
    return module


def check_fits(
    expected: Mapping[str, tuple[int, ...]],
    given: Mapping[str, tuple[int, ...]],
    source: str,
    fix: str = RECIPE_FIX,
    tied: Mapping[str, list[str]] | None = None,
) -> None:
    """Raise one MergeCliError listing every name and shape of ``given`` (tensor name -> shape)
    that the model's ``expected`` names and shapes do not take; shapes alone, so that a model
    built on the meta device and a checkpoint's header are enough. ``fix`` ends the message:
    what to change, in the terms of where the model came from. ``tied`` (`tied_names`): a
    tied parameter is there when ``given`` holds it under any of its names."""
    tied = tied or {}
    missing = [
        key
        for key in expected
        # torch itself tolerates a missing BatchNorm batch counter in plain dicts; it only
        # matters for momentum=None, which the built-ins do not use.
        if key not in given
        and not key.endswith(".num_batches_tracked")
        and not any(other in given for other in tied.get(key, ()))
    ]
    unexpected = [key for key in given if key not in expected]
    problems = [f"missing '{key}'" for key in missing]
    problems += [f"unexpected '{key}'" for key in unexpected]
    for key, shape in given.items():
        if key in expected and tuple(shape) != tuple(expected[key]):
            problems.append(
                f"tensor '{key}' has shape {_shape(shape)}, "
                f"the model expects {_shape(expected[key])}"
            )
    if problems:
        shown = "; ".join(problems[:MAX_PROBLEMS])
        if len(problems) > MAX_PROBLEMS:
            shown += f"; and {len(problems) - MAX_PROBLEMS} more"
        raise MergeCliError(
            f"{source}: does not fit the model: {shown}{_strip_hint(missing, unexpected)}; {fix}"
        )


def load_into_model(
    module: nn.Module, state_dict: dict[str, Tensor], source: str, fix: str = RECIPE_FIX
) -> None:
    """Copy ``state_dict`` into ``module`` (strict); raise one MergeCliError listing every problem.

    Nothing is copied unless everything fits, so the module is unchanged after a failure.
    """
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise MergeCliError(
                f"{source}: does not fit the model: '{key}' is a {type(value).__name__}, "
                "not a tensor"
            )
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    tied = tied_names(module)
    check_fits(expected, given, source, fix, tied)
    try:
        with torch.no_grad():
            # The names were checked above; torch's strict check knows nothing of ties.
            module.load_state_dict(state_dict, strict=not tied)
    except RuntimeError as exc:
        # Reached only for problems the checks above cannot see (e.g. a dtype that cannot cast).
        message = " ".join(str(exc).split())
        raise MergeCliError(f"{source}: does not fit the model: {message}") from exc
