"""Safetensors checkpoint I/O: resolve, read, fingerprint and atomically write checkpoints."""

from mergecli.io.checkpoint import (
    INDEX_NAME,
    checkpoint_sha256,
    load_state_dict,
    read_metadata,
    resolve_checkpoint_files,
    sha256_in_background,
)
from mergecli.io.sizes import parse_size
from mergecli.io.writer import SINGLE_NAME, save_state_dict, shard_name

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "checkpoint_sha256",
    "load_state_dict",
    "parse_size",
    "read_metadata",
    "resolve_checkpoint_files",
    "save_state_dict",
    "sha256_in_background",
    "shard_name",
]
