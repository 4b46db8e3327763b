"""The architecture a checkpoint's safetensors ``__metadata__`` names: written, and read back.

`mergecli train`, `run` and `align` write ``mergecli.arch`` and ``mergecli.args`` so that a later
run can rebuild the model without a ``model:`` section. Reading them is where a file could choose
code to import, so only a built-in architecture is taken from there, and ``hf`` only without
``trust_remote_code``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mergecli.errors import MergeCliError
from mergecli.models.hf import HF_ARCH
from mergecli.models.registry import builtin_architectures

ARCH_KEY = "mergecli.arch"
ARGS_KEY = "mergecli.args"


def model_metadata(arch: str, args: Mapping[str, Any]) -> dict[str, str]:
    """The metadata entries that name the architecture and its keyword arguments."""
    return {ARCH_KEY: arch, ARGS_KEY: json.dumps(args)}


def model_from_metadata(
    metadata: Mapping[str, str], path: str, needed: bool
) -> tuple[str, dict[str, Any]] | None:
    """The (arch, args) a checkpoint's metadata names, or None.

    Only a built-in is taken: a file must never choose code to import. A name of user code is
    refused when the model is ``needed``, else ignored (so not written to the output).
    """
    arch = metadata.get(ARCH_KEY)
    if arch is None:
        return None
    if arch not in builtin_architectures():
        if needed:
            raise MergeCliError(_user_code_refusal(metadata, path, arch))
        return None
    args = metadata_args(metadata, path, arch)
    if arch == HF_ARCH and args.get("trust_remote_code", False) is not False:
        # `hf` runs a model directory's own code only when a recipe says so, never a file.
        if needed:
            raise MergeCliError(_user_code_refusal(metadata, path, arch))
        return None
    return arch, args


def metadata_args(metadata: Mapping[str, str], path: str, arch: str) -> dict[str, Any]:
    """``mergecli.args``: a JSON mapping of keyword arguments, or a one-line error."""
    text = metadata.get(ARGS_KEY, "{}")
    try:
        args = json.loads(text)
        problem = None if isinstance(args, dict) else f"it is a JSON {type(args).__name__}"
    except json.JSONDecodeError as exc:
        problem = f"invalid JSON: {exc.msg} at character {exc.pos}"
    except RecursionError:
        problem = "invalid JSON: nested too deeply"
    if problem is not None:
        raise MergeCliError(
            f"{path}: metadata {ARGS_KEY} is not a mapping of keyword "
            f"arguments ({problem}); re-export the checkpoint, or name the model in the recipe: "
            f"`model: {{arch: {json.dumps(arch)}, args: {{...}}}}`"
        )
    return args


def _user_code_refusal(metadata: Mapping[str, str], path: str, arch: str) -> str:
    """What to say when metadata names a `package.module:factory`: the line to trust it with.
    The names are shown JSON-quoted: a file's text must not write control characters."""
    try:
        args = json.dumps(metadata_args(metadata, path, arch))
    except MergeCliError:
        args = "{...}"
    args = args if len(args) <= 200 else "{...}"
    what = f"names user code ({ARCH_KEY}: {json.dumps(arch)})"
    if arch == HF_ARCH:
        what = f"asks to run the model directory's own code ({ARGS_KEY}: trust_remote_code)"
    return (
        f"{path}: its metadata {what}, which only a recipe may import; if you trust that code, add "
        f"`model: {{arch: {json.dumps(arch)}, args: {args}}}` to the recipe "
        f"(or --set model.arch={json.dumps(arch)})"
    )
