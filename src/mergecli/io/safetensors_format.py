"""Writing the safetensors format directly, so that the same tensors give the same bytes.

The `safetensors` package stores ``__metadata__`` through a hash map whose order changes from
run to run; a reproducible tool needs bit-identical files, so the header is built here with
sorted metadata keys and tensors in the order given. Files are read back with `safetensors`.
Format: 8-byte little-endian header length, a JSON header padded with spaces to a multiple of
8 bytes, then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

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
