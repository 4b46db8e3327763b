"""Broken or mismatched checkpoints, as `mergecli run` meets them: one line naming the file and
the tensor, no traceback, no model file written; exit 2 at the checkpoint's line in the recipe
for what the checks before any work find (headers, names, shapes, dtypes), exit 1 for what
only reading the tensors shows (NaN). Most run out of core (a data-free
recipe), where tensors are read lazily from hand-checked headers."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_cli

GOOD = {"layers.0.weight": torch.ones(2, 2), "layers.0.bias": torch.zeros(2)}


def raw_safetensors(path: Path, header: object, data: bytes = b"") -> Path:
    """A file in the safetensors layout with whatever header it is given."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def entry(**fields: object) -> dict[str, object]:
    """The header entry of a 2x2 float32 tensor, with ``fields`` changed (None: left out)."""
    base = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    return {k: v for k, v in {**base, **fields}.items() if v is not None}


def run_average(tmp_path: Path, first: Path, second: Path, model: bool = False):
    """`mergecli run` of an average of two checkpoints (out of core unless ``model``)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "version: 1\n"
        + ("model: {arch: mlp, args: {depth: 3, hidden: 32}}\n" if model else "")
        + f"checkpoints:\n  - {{path: {first}}}\n  - {{path: {second}}}\n"
        + "steps:\n  - merge: {method: average}\n"
        + f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    return run_cli("run", str(recipe))


def at_checkpoint(tmp_path: Path, index: int, model: bool = False) -> str:
    """How a problem with checkpoint ``index`` of `run_average`'s recipe starts."""
    return f"{tmp_path / 'recipe.yaml'}:{3 + index + model}: checkpoints.{index}.path: "


def one_error(tmp_path: Path, result, code: int = 2) -> str:
    """The run failed with ``code`` on one line, with no traceback and no model file."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    # Progress lines start with a timestamp; the failure itself is exactly one line.
    lines = [line for line in result.stderr.strip().splitlines() if not line[:4].isdigit()]
    assert len(lines) == 1, result.stderr
    out = tmp_path / "out"
    assert not (out.exists() and [p.name for p in out.iterdir() if "model" in p.name])
    return lines[0]


def good_checkpoint(tmp_path: Path) -> Path:
    save_file(GOOD, tmp_path / "good.safetensors")
    return tmp_path / "good.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param([1, 2], "the header is a JSON list, not an object", id="list"),
        pytest.param({"w": 5}, "tensor 'w' has no header entry object", id="not-an-object"),
        pytest.param(
            {"w": entry(data_offsets=None)}, "tensor 'w' lacks 'data_offsets'", id="no-offsets"
        ),
        pytest.param({"w": entry(dtype=None)}, "tensor 'w' lacks 'dtype'", id="no-dtype"),
        pytest.param({"w": entry(shape=None)}, "tensor 'w' lacks 'shape'", id="no-shape"),
        pytest.param(
            {"w": entry(data_offsets=16)},
            "tensor 'w' has data_offsets 16, not [begin, end]",
            id="offsets-not-a-list",
        ),
        pytest.param(
            {"w": entry(data_offsets=[0, 64])},
            "tensor 'w' lies past the end of the file, at bytes 0-64 of a 16-byte data section",
            id="past-the-end",
        ),
        pytest.param(
            {"w": entry(shape=[3, 3])},
            "tensor 'w' holds 16 bytes; shape [3, 3] of F32 needs 36",
            id="size-mismatch",
        ),
    ],
)
def test_malformed_header_is_a_user_error(tmp_path: Path, header, expected: str) -> None:
    bad = raw_safetensors(tmp_path / "bad.safetensors", header, bytes(16))
    line = one_error(tmp_path, run_average(tmp_path, good_checkpoint(tmp_path), bad))
    assert line.startswith(
        f"{at_checkpoint(tmp_path, 1)}{bad}: not a readable safetensors file ("
    ), line
    assert expected in line and line.endswith("re-download or re-save it"), line


@pytest.mark.slow
def test_nan_in_a_checkpoint_read_out_of_core_names_the_file_and_tensor(tmp_path: Path) -> None:
    broken = {**GOOD, "layers.0.weight": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}
    save_file(broken, tmp_path / "nan.safetensors")
    line = one_error(
        tmp_path,
        run_average(tmp_path, good_checkpoint(tmp_path), tmp_path / "nan.safetensors"),
        code=1,
    )
    assert line == (
        f"error: {tmp_path / 'nan.safetensors'}: tensor 'layers.0.weight' contains NaN or inf "
        "values; the checkpoint is broken (re-train or re-export it)"
    )


@pytest.mark.slow
def test_symlink_loop_and_dangling_link_say_so(tmp_path: Path) -> None:
    loop = tmp_path / "loop.safetensors"
    os.symlink(loop.name, loop)
    line = one_error(tmp_path, run_average(tmp_path, good_checkpoint(tmp_path), loop))
    assert line.startswith(f"{at_checkpoint(tmp_path, 1)}{loop}: symbolic link loop"), line
    dangling = tmp_path / "dangling.safetensors"
    os.symlink("gone.safetensors", dangling)
    line = one_error(tmp_path, run_average(tmp_path, good_checkpoint(tmp_path), dangling))
    assert f"{dangling}: symbolic link to gone.safetensors, which does not exist" in line


@pytest.mark.slow
@pytest.mark.parametrize("model", [False, True], ids=["out-of-core", "in-memory"])
@pytest.mark.parametrize("integer_first", [True, False], ids=["integer-first", "float-first"])
def test_tensor_integer_in_one_checkpoint_and_float_in_another(
    tmp_path: Path, model: bool, integer_first: bool
) -> None:
    integer = tmp_path / "integer.safetensors"
    save_file({**GOOD, "layers.0.weight": torch.ones(2, 2, dtype=torch.int64)}, integer)
    good = good_checkpoint(tmp_path)
    first, second = (integer, good) if integer_first else (good, integer)
    line = one_error(tmp_path, run_average(tmp_path, first, second, model=model))
    kinds = ["int64 (integer)", "float32 (floating-point)"]
    kinds = kinds if integer_first else kinds[::-1]
    assert line == (
        f"{at_checkpoint(tmp_path, 1, model)}{second}: tensor 'layers.0.weight' is {kinds[1]} "
        f"but {kinds[0]} in {first}; "
        "a tensor must be floating-point in every checkpoint or in none: re-export the odd one"
    )


@pytest.mark.slow
def test_integer_tensors_are_copied_but_all_integer_checkpoints_are_refused(
    tmp_path: Path,
) -> None:
    # Counters integer in every checkpoint come from the reference; the weights are averaged.
    for name, value in (("a", 1.0), ("b", 3.0)):
        tensors = {"w": torch.full((2, 2), value), "steps": torch.tensor(7 if name == "a" else 9)}
        save_file(tensors, tmp_path / f"{name}.safetensors")
    result = run_average(tmp_path, tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert result.returncode == 0, result.stderr
    merged = load_file(tmp_path / "out" / "model.safetensors")
    # The average of 1 and 3 is 2 exactly, whatever the order of the float operations.
    assert torch.equal(merged["w"], torch.full((2, 2), 2.0)) and merged["steps"].item() == 7
    # Nothing floating: nothing to merge, rather than an unchanged copy of the reference.
    for name in ("c", "d"):
        ids = {"position_ids": torch.arange(4), "mask": torch.ones(4, dtype=torch.bool)}
        save_file(ids, tmp_path / f"{name}.safetensors")
    (tmp_path / "out").rename(tmp_path / "first-out")
    first = tmp_path / "c.safetensors"
    line = one_error(tmp_path, run_average(tmp_path, first, tmp_path / "d.safetensors"))
    assert line == (
        f"{at_checkpoint(tmp_path, 0)}{first}: none of its 2 tensors is floating-point (all are "
        "integer or bool), nor are the other checkpoints', so there is nothing to merge; check "
        "that these are model weights"
    )
