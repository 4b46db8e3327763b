"""`mergecli inspect`: the tensors of a checkpoint, or the per-tensor difference of two."""

from __future__ import annotations

import json

import torch

from mergecli.io import load_state_dict, read_metadata
from mergecli.runtime.log import Log


def inspect_checkpoints(path: str, other: str | None, log: Log) -> None:
    """Print a table of name, shape, dtype, size (and ||A - B||, relative, for two checkpoints)."""
    tensors = load_state_dict(path)
    metadata = read_metadata(path)
    if metadata:
        log.table(f"metadata of {path}", ["key", "value"], sorted(metadata.items()))
    if other is None:
        rows = [
            [name, _shape(t), _dtype(t), _size(t.numel() * t.element_size())]
            for name, t in tensors.items()
        ]
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        params = sum(t.numel() for t in tensors.values())
        rows.append(["total", f"{params:,} values", "", _size(total)])
        log.table(f"{path}: {len(tensors)} tensors", ["tensor", "shape", "dtype", "size"], rows)
        return
    second = load_state_dict(other)
    rows = []
    for name in sorted(set(tensors) | set(second)):
        a, b = tensors.get(name), second.get(name)
        if a is None or b is None:
            where = other if a is not None else path
            rows.append([name, _shape(a if a is not None else b), "", f"missing in {where}", ""])
        elif a.shape != b.shape:
            rows.append([name, f"{_shape(a)} vs {_shape(b)}", "", "shape differs", ""])
        else:
            diff = (a.double() - b.double()).norm().item()
            scale = a.double().norm().item()
            relative = f"{diff / scale:.3g}" if scale > 0 else "-"
            rows.append([name, _shape(a), f"{_dtype(a)}/{_dtype(b)}", f"{diff:.4g}", relative])
    log.table(
        f"{path} vs {other}",
        ["tensor", "shape", "dtypes", "‖A−B‖", "‖A−B‖/‖A‖"],
        rows,
    )


def _shape(tensor: torch.Tensor) -> str:
    return json.dumps(list(tensor.shape))


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"
