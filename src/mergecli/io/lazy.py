"""Checkpoints read one tensor at a time from memory-mapped safetensors files."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from mergecli.io.checkpoint import _resolve, _unreadable


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only mapping name -> tensor whose values are read from disk when asked for.

    Only the headers are read up front, so shapes are known without loading; each lookup
    reads one tensor (the OS pages it in from the memory-mapped file and can drop it again).
    """

    def __init__(self, path: str | Path) -> None:
        layout = _resolve(path)
        self.path = Path(path)
        self._handles = []
        self._where: dict[str, object] = {}
        for file in layout.files:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
                names = list(handle.keys())
            except Exception as exc:
                raise _unreadable(file, exc) from exc
            self._handles.append(handle)
            for name in names:
                self._where[name] = handle
        order = list(layout.weight_map) if layout.weight_map else []
        self._names = [n for n in order if n in self._where] + [
            n for n in self._where if n not in layout.weight_map
        ]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def is_floating(self, name: str) -> bool:
        return self._where[name].get_slice(name).get_dtype() in ("F64", "F32", "F16", "BF16")


def tensor_shape(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """A tensor's shape, without reading it when the mapping is lazy."""
    if isinstance(tensors, LazyTensors):
        return tensors.shape(name)
    return tuple(tensors[name].shape)
