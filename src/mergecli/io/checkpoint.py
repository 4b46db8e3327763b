"""Find, read and fingerprint safetensors checkpoints (single files, HF dirs, sharded dirs)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from mergecli.errors import MergeCliError
from mergecli.io.digest import checkpoint_sha256, sha256_in_background
from mergecli.io.layout import (
    INDEX_NAME,
    Layout,
    checkpoint_layout,
    resolve_checkpoint_files,
)

__all__ = [
    "INDEX_NAME",
    "Layout",
    "checkpoint_layout",
    "checkpoint_sha256",
    "load_state_dict",
    "read_metadata",
    "resolve_checkpoint_files",
    "sha256_in_background",
]


def _unreadable(path: Path, exc: BaseException) -> MergeCliError:
    """Build the one-line error for a corrupt, truncated or non-safetensors file."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return MergeCliError(
        f"{path}: not a readable safetensors file ({reason}); re-download or re-save it"
    )


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of one safetensors file onto the CPU."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            # A safe_open handle is not iterable, so .keys() is required here.
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except MemoryError:
        raise
    # safetensors raises SafetensorError for bad headers and short data, but unknown dtypes and
    # OS-level read failures surface as other types; all of them mean "this file is unusable".
    except Exception as exc:
        raise _unreadable(path, exc) from exc


def load_state_dict(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read all tensors of the checkpoint at ``path`` (all shards) onto ``device``."""
    layout = checkpoint_layout(path)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in layout.files:
        for name, tensor in _read_file(file).items():
            if name in state:
                raise MergeCliError(
                    f"{layout.root}: tensor {name!r} appears in both {origin[name].name} and "
                    f"{file.name}; the checkpoint is inconsistent, re-save it"
                )
            state[name] = tensor
            origin[name] = file
    for name, shard in layout.weight_map.items():
        if name not in state:
            raise MergeCliError(
                f"{layout.index}: lists tensor {name!r} in {shard} but no shard contains it; "
                "re-download or re-save the checkpoint"
            )
    if layout.weight_map:
        # safetensors sorts names within a file; the index keeps the order they were saved in.
        state = {name: state[name] for name in layout.weight_map} | state
    if torch.device(device).type != "cpu":
        state = {name: t.to(device) for name, t in state.items()}
    return state


def read_metadata(path: str | Path) -> dict[str, str]:
    """Return the safetensors ``__metadata__`` of the checkpoint (first shard if sharded)."""
    first = checkpoint_layout(path).files[0]
    try:
        with safe_open(str(first), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except MemoryError:
        raise
    except Exception as exc:
        raise _unreadable(first, exc) from exc
