"""Checkpoints read one tensor at a time: with plain reads, or each tensor mapped on its own.

Pages of a memory-mapped file that a merge has touched stay resident and count toward the
process's memory until the kernel reclaims them, so a merge that maps whole files ends up
holding all three models. Reading each tensor into its own buffer, or mapping each tensor alone
and unmapping it when it is dropped (`LazyTensors.mapped`), keeps the resident memory at the
tensors in flight; the mapping saves the copy from the page cache, which for a cheap method is
a large part of its time.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from mergecli.errors import MergeCliError
from mergecli.io.checkpoint import checkpoint_layout
from mergecli.io.safetensors_format import BadSafetensors, TensorEntry, header_entries, read_header


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only mapping name -> tensor; only the headers are read up front."""

    def __init__(self, path: str | Path) -> None:
        layout = checkpoint_layout(path)
        self.path = Path(path)
        self._entries: dict[str, tuple[Path, int, TensorEntry]] = {}
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
        # torch.empty, not bytearray: a buffer the read overwrites need not be zeroed first.
        return self.read(name, torch.empty(self.nbytes(name), dtype=torch.uint8))

    def nbytes(self, name: str) -> int:
        entry = self._entries[name][2]
        return entry.end - entry.begin

    def read(self, name: str, buffer: torch.Tensor) -> torch.Tensor:
        """``name`` read into ``buffer`` (contiguous CPU uint8 of `nbytes`), viewed as the tensor:
        a caller that reuses one buffer for many tensors saves an allocation per tensor."""
        file, start, entry = self._entries[name]
        if len(buffer) != entry.end - entry.begin:
            raise ValueError(f"{name}: needs a buffer of {entry.end - entry.begin} bytes")
        if not len(buffer):
            return torch.empty(entry.shape, dtype=entry.dtype)
        view, done = memoryview(buffer.numpy()), 0
        with open(file, "rb", buffering=0) as handle:
            handle.seek(start + entry.begin)
            # One read returns at most about 2 GiB on Linux: a bigger tensor takes several.
            while done < len(view) and (got := handle.readinto(view[done:])):
                done += got
        if done != len(view):
            raise MergeCliError(f"{file}: tensor {name!r} is cut short; the file is truncated")
        return buffer.view(entry.dtype).reshape(entry.shape)

    def mapped(self, name: str) -> torch.Tensor:
        """``name`` as a tensor over a private memory map of its bytes alone (no copy): unmapped
        when the tensor and every view of it are gone. Writes to it stay in this process.

        The file's size is checked first, since touching a mapped page past the end of a file
        kills the process (SIGBUS); a file truncated while a run maps it still does, as it
        would under any memory-mapping loader.
        """
        file, start, entry = self._entries[name]
        begin, count = start + entry.begin, entry.end - entry.begin
        if not count:
            return torch.empty(entry.shape, dtype=entry.dtype)
        with open(file, "rb") as handle:
            if os.fstat(handle.fileno()).st_size < begin + count:
                raise MergeCliError(f"{file}: tensor {name!r} is cut short; the file is truncated")
            aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
            # ACCESS_COPY: a writable (so torch takes it without a warning) private mapping.
            region = mmap.mmap(
                handle.fileno(), begin + count - aligned, access=mmap.ACCESS_COPY, offset=aligned
            )
        data = torch.frombuffer(region, dtype=torch.uint8, offset=begin - aligned, count=count)
        return data.view(entry.dtype).reshape(entry.shape)

    def __contains__(self, name: object) -> bool:
        # Mapping's own __contains__ would read the tensor to answer.
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][2].dtype

    def file_of(self, name: str) -> Path:
        """The file that holds ``name`` (a shard, for a sharded checkpoint)."""
        return self._entries[name][0]


def _header(file: Path) -> dict[str, tuple[int, TensorEntry]]:
    """Tensor name -> (offset of the data section, header entry), checked against the file."""
    try:
        header, start = read_header(file)
        entries = header_entries(header, start, os.path.getsize(file))
    except BadSafetensors as exc:
        raise MergeCliError(
            f"{file}: not a readable safetensors file ({exc}); re-download or re-save it"
        ) from None
    return {name: (start, entry) for name, entry in entries.items()}


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
