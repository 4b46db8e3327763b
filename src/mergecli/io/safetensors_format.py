"""Writing the safetensors format directly, so that the same tensors give the same bytes.

The `safetensors` package stores ``__metadata__`` through a hash map whose order changes from
run to run; a reproducible tool needs bit-identical files, so the header is built here with
sorted metadata keys and tensors in the order given. Files are read back with `safetensors`.
Format: 8-byte little-endian header length, a JSON header padded with spaces to a multiple of
8 bytes, then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
# The `safetensors` package refuses longer headers; a bigger length prefix is a broken file.
MAX_HEADER = 100_000_000


class BadSafetensors(ValueError):
    """Why a file is not a readable safetensors file; names the tensor at fault, if one is."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's header entry, checked: its bytes are ``[begin, end)`` of the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header's JSON object and the file offset where the data section begins.

    Reads only the header, so a caller can look at ``__metadata__`` before trusting any tensor.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise BadSafetensors("shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, MAX_HEADER):
            raise BadSafetensors(f"its header length ({length} bytes) exceeds the file")
        text = handle.read(length)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadSafetensors(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise BadSafetensors(f"the header is a JSON {type(header).__name__}, not an object")
    return header, 8 + length


def header_metadata(header: Mapping[str, Any]) -> dict[str, str]:
    """The ``__metadata__`` of a header from ``read_header``: string keys to string values."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadSafetensors("its __metadata__ is not an object of strings")
    return metadata


def header_entries(header: Mapping[str, Any], start: int, size: int) -> dict[str, TensorEntry]:
    """The tensors of a header from ``read_header`` (data from ``start`` in a file of ``size``
    bytes), each checked so that reading it cannot fail or read another tensor's bytes."""
    return {
        name: _entry(name, entry, size - start)
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _entry(name: str, entry: Any, available: int) -> TensorEntry:
    if not isinstance(entry, dict):
        raise BadSafetensors(f"tensor {name!r} has no header entry object")
    lacking = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if lacking:
        raise BadSafetensors(f"tensor {name!r} lacks {', '.join(map(repr, lacking))}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    dtype = CODE_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise BadSafetensors(f"tensor {name!r} has dtype {code!r}, unknown to mergecli")
    if not _naturals(shape):
        raise BadSafetensors(f"tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not (_naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise BadSafetensors(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if end > available:
        raise BadSafetensors(
            f"tensor {name!r} lies past the end of the file, at bytes {begin}-{end} of a "
            f"{available}-byte data section"
        )
    needed = math.prod(shape) * dtype.itemsize
    if end - begin != needed:
        raise BadSafetensors(
            f"tensor {name!r} holds {end - begin} bytes; shape {shape} of {code} needs {needed}"
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


def _naturals(value: Any) -> bool:
    """A JSON list of non-negative integers (``true`` is no size, though Python says int)."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def safetensors_header(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> bytes:
    """The length prefix and padded JSON header for ``tensors`` laid out in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_CODES:
            raise TypeError(
                f"tensor '{name}': dtype {tensor.dtype} cannot be stored in safetensors"
            )
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> None:
    """Write ``tensors`` (CPU, contiguous) to ``path`` in the safetensors format."""
    if sys.byteorder != "little":
        raise RuntimeError("writing safetensors needs a little-endian machine")
    with open(path, "wb") as handle:
        handle.write(safetensors_header(tensors, metadata))
        for tensor in tensors.values():
            if tensor.numel():
                flat = tensor.detach().to("cpu").contiguous().reshape(-1)
                handle.write(flat.view(torch.uint8).numpy().tobytes())
