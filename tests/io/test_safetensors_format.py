"""Our safetensors writer, checked against the reference reader of the `safetensors` package."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergecli.io.safetensors_format import DTYPE_CODES, write_safetensors


def test_every_dtype_round_trips_through_the_reference_reader(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {}
    for dtype in DTYPE_CODES:
        if dtype.is_floating_point:
            tensors[f"t_{dtype}"] = torch.randn(3, 5).to(dtype)
        elif dtype == torch.bool:
            tensors["t_bool"] = torch.rand(7) > 0.5
        else:
            tensors[f"t_{dtype}"] = torch.randint(
                -5 if dtype != torch.uint8 else 0, 100, (2, 3)
            ).to(dtype)
    tensors["scalar"] = torch.tensor(42)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["strided"] = torch.arange(12.0).reshape(3, 4).t()
    path = tmp_path / "all.safetensors"
    write_safetensors(path, tensors, {"b": "2", "a": "1"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (loaded[name], tensor)]
        assert torch.equal(*as_bytes), name
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"a": "1", "b": "2"}
    # The header is padded so that tensor data starts 8-byte aligned.
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0


def test_same_input_gives_same_bytes(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    metadata = {f"key{i}": str(i) for i in range(20)}
    write_safetensors(tmp_path / "1.safetensors", tensors, metadata)
    write_safetensors(tmp_path / "2.safetensors", tensors, dict(reversed(metadata.items())))
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


def test_unsupported_dtype_is_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="tensor 'z'"):
        write_safetensors(
            tmp_path / "c.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)}, None
        )
