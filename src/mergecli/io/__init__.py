"""Safetensors checkpoint I/O: resolve, read, fingerprint and atomically write checkpoints.

Names are loaded on first use, so that the torch-free parts (`mergecli.io.layout`,
`mergecli.io.digest`) can be imported without torch."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "INDEX_NAME": "mergecli.io.layout",
    "resolve_checkpoint_files": "mergecli.io.layout",
    "checkpoint_sha256": "mergecli.io.digest",
    "sha256_in_background": "mergecli.io.digest",
    "load_state_dict": "mergecli.io.checkpoint",
    "read_metadata": "mergecli.io.checkpoint",
    "parse_size": "mergecli.io.sizes",
    "SINGLE_NAME": "mergecli.io.writer",
    "save_state_dict": "mergecli.io.writer",
    "shard_name": "mergecli.io.writer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mergecli.io' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
