"""Checkpoints read one tensor at a time, with plain reads rather than memory maps.

Pages of a memory-mapped file that a merge has touched stay resident and count toward the
process's memory until the kernel reclaims them, so a merge that reads every tensor of three
models through mmap ends up holding all three. Reading each tensor into its own buffer keeps
the resident memory at the tensors in flight.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from mergecli.errors import MergeCliError
from mergecli.io.checkpoint import _resolve

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only mapping name -> tensor; only the headers are read up front."""

    def __init__(self, path: str | Path) -> None:
        layout = _resolve(path)
        self.path = Path(path)
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for file in layout.files:
            for name, (start, entry) in _header(file).items():
                if name in self._entries:
                    raise MergeCliError(
                        f"{layout.root}: tensor {name!r} appears in two shards; re-save it"
                    )
                self._entries[name] = (file, start, entry)
        order = [n for n in layout.weight_map if n in self._entries]
        self._names = order + [n for n in self._entries if n not in layout.weight_map]

    def __getitem__(self, name: str) -> torch.Tensor:
        file, start, entry = self._entries[name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(file, "rb") as handle:
            handle.seek(start + begin)
            if handle.readinto(buffer) != len(buffer):
                raise MergeCliError(f"{file}: tensor {name!r} is cut short; the file is truncated")
        dtype = DTYPES[entry["dtype"]]
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][2]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entries[name][2]["dtype"]]

    def is_floating(self, name: str) -> bool:
        return self._entries[name][2]["dtype"] in FLOATING


def _header(file: Path) -> dict[str, tuple[int, dict]]:
    """Tensor name -> (offset of the data section, header entry), checked against the file."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise MergeCliError(
            f"{file}: not a readable safetensors file ({exc}); re-download or re-save it"
        ) from None
    header.pop("__metadata__", None)
    start = 8 + length
    entries = {}
    for name, entry in header.items():
        if entry.get("dtype") not in DTYPES or start + entry["data_offsets"][1] > size:
            raise MergeCliError(
                f"{file}: tensor {name!r} has an unknown dtype or lies past the end of the file; "
                "re-download or re-save it"
            )
        entries[name] = (start, entry)
    return entries


def tensor_shape(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """A tensor's shape, without reading it when the mapping is lazy."""
    if isinstance(tensors, LazyTensors):
        return tensors.shape(name)
    return tuple(tensors[name].shape)


def tensor_dtype(tensors: Mapping[str, torch.Tensor], name: str) -> torch.dtype:
    """A tensor's dtype, without reading it when the mapping is lazy."""
    if isinstance(tensors, LazyTensors):
        return tensors.dtype(name)
    return tensors[name].dtype
