"""`mergecli inspect`: the tensors of a checkpoint, or the per-tensor difference of two."""

from __future__ import annotations

import json

import torch

from mergecli.io import load_state_dict, read_metadata
from mergecli.io.sizes import format_size
from mergecli.runtime.log import Column, Log


def inspect_checkpoints(path: str, other: str | None, log: Log) -> None:
    """Print a table of name, shape, dtype, size (and ||A - B||, relative, for two checkpoints)."""
    tensors = load_state_dict(path)
    metadata = read_metadata(path)
    if metadata:
        log.table(f"metadata of {path}", ["key", "value"], sorted(metadata.items()))
    if other is None:
        rows: list[list] = [
            [name, list(t.shape), _dtype(t), t.numel(), t.numel() * t.element_size()]
            for name, t in tensors.items()
        ]
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        params = sum(t.numel() for t in tensors.values())
        rows.append(["total", None, None, params, total])
        count, size = Column("values", show="{:,}".format), Column("size", "bytes", format_size)
        columns = ["tensor", Column("shape", show=json.dumps), "dtype", count, size]
        log.table(f"{path}: {len(tensors)} tensors", columns, rows)
        return
    second = load_state_dict(other)
    rows = []
    for name in sorted(set(tensors) | set(second)):
        a, b = tensors.get(name), second.get(name)
        if a is None or b is None:
            where = other if a is not None else path
            shape = list((a if a is not None else b).shape)
            rows.append([name, shape, None, None, None, f"missing in {where}"])
        elif a.shape != b.shape:
            note = f"shape differs: {_shape(a)} vs {_shape(b)}"
            rows.append([name, list(a.shape), None, None, None, note])
        else:
            diff = (a.double() - b.double()).norm().item()
            scale = a.double().norm().item()
            relative = diff / scale if scale > 0 else None
            rows.append([name, list(a.shape), f"{_dtype(a)}/{_dtype(b)}", diff, relative, None])
    columns = ["tensor", Column("shape", show=json.dumps), "dtypes",
               Column("‖A−B‖", "diff_norm", "{:.4g}".format),
               Column("‖A−B‖/‖A‖", "relative_diff", "{:.3g}".format, "-"), "note"]  # fmt: skip
    log.table(f"{path} vs {other}", columns, rows)


def _shape(tensor: torch.Tensor) -> str:
    return json.dumps(list(tensor.shape))


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")
