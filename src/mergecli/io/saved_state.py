"""Resumable state as safetensors plus JSON: an optimizer's state split into named tensors and
plain values, and joined again. Never a pickle: loading one runs whatever code it names."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

from mergecli.errors import MergeCliError
from mergecli.io.atomic import atomic_target
from mergecli.io.safetensors_format import (
    BadSafetensors,
    header_metadata,
    read_header,
    write_safetensors,
)


def split_optimizer(
    state: dict[str, Any], prefix: str = "optimizer"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An ``optimizer.state_dict()`` as (tensors, JSON-able plain values): each per-parameter
    tensor is named ``<prefix>.state.<param>.<key>`` and referred to as ``{"tensor": name}``."""
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        plain[str(index)] = {}
        for key, value in values.items():
            if isinstance(value, Tensor):
                name = f"{prefix}.state.{index}.{key}"
                tensors[name] = value
                value = {"tensor": name}
            plain[str(index)][key] = value
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def join_optimizer(plain: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """The ``optimizer.state_dict()`` that ``split_optimizer`` split, whole again."""
    return {
        "state": {
            int(index): {
                key: tensors[value["tensor"]] if isinstance(value, dict) else value
                for key, value in values.items()
            }
            for index, values in plain["state"].items()
        },
        # JSON has no tuples: Adam's betas come back as lists otherwise.
        "param_groups": [
            {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
            for g in plain["param_groups"]
        ],
    }


@dataclass(frozen=True)
class StateFormat:
    """One kind of resumable state (a fit's, a training's): safetensors whose header holds a
    fingerprint of what produced it and the plain values as JSON. The fingerprint is read
    before any tensor, so another run's state is refused unread."""

    fingerprint_key: str
    plain_key: str
    what: str  # e.g. "fit state"
    owner: str  # whose state it is, when the fingerprint differs
    hint: str  # what to do about a state that cannot be used

    def read(
        self,
        path: Path,
        fingerprint: str,
        decode: Callable[[dict[str, Any], dict[str, Tensor]], dict[str, Any]],
    ) -> dict[str, Any] | None:
        """The decoded payload, None when there is no state; a one-line error otherwise."""
        if not path.exists():
            return None
        try:
            header, _ = read_header(path)
            metadata = header_metadata(header)
        except (BadSafetensors, OSError) as exc:
            raise self.unreadable(path, exc) from None
        if self.plain_key not in metadata:
            raise MergeCliError(f"{path}: not a mergecli {self.what}; {self.hint}")
        if metadata.get(self.fingerprint_key) != fingerprint:
            raise MergeCliError(f"{path}: saved {self.what} belongs to {self.owner}; {self.hint}")
        try:
            return decode(json.loads(metadata[self.plain_key]), load_file(path))
        except MemoryError:
            raise
        except Exception as exc:  # a broken file, whatever part of it: one line, not exit 70
            raise self.unreadable(path, exc) from None

    def write(
        self, path: Path, fingerprint: str, tensors: dict[str, Tensor], plain: dict[str, Any]
    ) -> None:
        metadata = {self.fingerprint_key: fingerprint, self.plain_key: json.dumps(plain)}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(path) as tmp:
            write_safetensors(tmp, tensors, metadata)

    def unreadable(self, path: Path, exc: BaseException) -> MergeCliError:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return MergeCliError(f"{path}: not a readable {self.what} ({reason}); {self.hint}")
