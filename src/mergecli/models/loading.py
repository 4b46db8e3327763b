"""Load a state dict into a model, reporting every mismatch at once."""

from __future__ import annotations

from collections.abc import Mapping

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


def check_fits(
    expected: Mapping[str, tuple[int, ...]],
    given: Mapping[str, tuple[int, ...]],
    source: str,
    fix: str = RECIPE_FIX,
) -> None:
    """Raise one MergeCliError listing every name and shape of ``given`` (tensor name -> shape)
    that the model's ``expected`` names and shapes do not take; shapes alone, so that a model
    built on the meta device and a checkpoint's header are enough. ``fix`` ends the message:
    what to change, in the terms of where the model came from."""
    missing = [
        key
        for key in expected
        # torch itself tolerates a missing BatchNorm batch counter in plain dicts; it only
        # matters for momentum=None, which the built-ins do not use.
        if key not in given and not key.endswith(".num_batches_tracked")
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
    check_fits(expected, {k: tuple(v.shape) for k, v in state_dict.items()}, source, fix)
    try:
        with torch.no_grad():
            module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        # Reached only for problems the checks above cannot see (e.g. a dtype that cannot cast).
        message = " ".join(str(exc).split())
        raise MergeCliError(f"{source}: does not fit the model: {message}") from exc
