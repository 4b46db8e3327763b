"""Tests for mergecli.io: resolving, reading, hashing and atomically writing checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergecli.io.writer as writer_mod
from mergecli.errors import MergeCliError
from mergecli.io import (
    checkpoint_sha256,
    load_state_dict,
    parse_size,
    read_metadata,
    resolve_checkpoint_files,
    save_state_dict,
)


def _state() -> dict[str, torch.Tensor]:
    """A small mixed-dtype state dict, like a conv net with BatchNorm."""
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(8, generator=g),
        "bn.running_mean": torch.randn(8, generator=g).double(),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "fc.weight": torch.randn(10, 32, generator=g).half(),
        "mask": torch.tensor([True, False, True]),
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def _final_and_temp_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


# --- round trips -------------------------------------------------------------------------------


def test_single_file_round_trip(tmp_path: Path) -> None:
    state = _state()
    paths = save_state_dict(state, tmp_path / "out", metadata={"recipe": "r.yaml", "n": 3})
    assert paths == [tmp_path / "out" / "model.safetensors"]
    assert _final_and_temp_files(tmp_path / "out") == ["model.safetensors"]
    for target in (paths[0], tmp_path / "out"):
        loaded = load_state_dict(target)
        assert sorted(loaded) == sorted(state)  # safetensors stores names sorted
        _assert_same(state, loaded)
        assert read_metadata(target) == {"recipe": "r.yaml", "n": "3"}


def test_sharded_round_trip(tmp_path: Path) -> None:
    state = {f"layer{i}.weight": torch.full((25,), float(i)) for i in range(5)}  # 100 B each
    state["big"] = torch.zeros(100)  # 400 B > shard_size: a shard of its own
    state["tail"] = torch.ones(10)
    out = tmp_path / "out"
    paths = save_state_dict(state, out, metadata={"k": "v"}, shard_size=250)

    # Shards: [l0, l1] [l2, l3] [l4] [big] [tail]
    shard_names = [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert [p.name for p in paths] == shard_names + ["model.safetensors.index.json"]
    assert _final_and_temp_files(out) == sorted(shard_names + ["model.safetensors.index.json"])

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 5 * 100 + 400 + 40, "k": "v"}
    assert list(index["weight_map"]) == list(state)
    assert index["weight_map"]["layer1.weight"] == shard_names[0]
    assert index["weight_map"]["layer2.weight"] == shard_names[1]
    assert index["weight_map"]["layer4.weight"] == shard_names[2]
    assert index["weight_map"]["big"] == shard_names[3]
    assert index["weight_map"]["tail"] == shard_names[4]

    assert resolve_checkpoint_files(out) == [out / n for n in shard_names]
    loaded = load_state_dict(out)
    assert list(loaded) == list(state)  # the index preserves the written order
    _assert_same(state, loaded)
    assert read_metadata(out) == {"k": "v"}


def test_everything_fits_gives_single_file(tmp_path: Path) -> None:
    paths = save_state_dict(_state(), tmp_path, shard_size=parse_size("5GB"))
    assert [p.name for p in paths] == ["model.safetensors"]


def test_layout_switch_removes_stale_outputs(tmp_path: Path) -> None:
    state = {f"t{i}": torch.full((25,), float(i)) for i in range(4)}
    save_state_dict(state, tmp_path, shard_size=100)
    assert len(list(tmp_path.glob("model-*-of-00004.safetensors"))) == 4
    save_state_dict(state, tmp_path, shard_size=200)
    assert _final_and_temp_files(tmp_path) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    save_state_dict(state, tmp_path)
    assert _final_and_temp_files(tmp_path) == ["model.safetensors"]
    save_state_dict(state, tmp_path, shard_size=200)
    assert "model.safetensors" not in _final_and_temp_files(tmp_path)
    _assert_same(state, load_state_dict(tmp_path))


def test_dir_with_one_safetensors_loads(tmp_path: Path) -> None:
    state = _state()
    save_file(state, str(tmp_path / "weights.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_checkpoint_files(tmp_path) == [tmp_path / "weights.safetensors"]
    _assert_same(state, load_state_dict(tmp_path))
    assert read_metadata(tmp_path) == {}


def test_dtype_converts_floats_only(tmp_path: Path) -> None:
    save_state_dict(_state(), tmp_path, dtype=torch.bfloat16)
    loaded = load_state_dict(tmp_path)
    assert loaded["conv.weight"].dtype == torch.bfloat16
    assert loaded["bn.running_mean"].dtype == torch.bfloat16
    assert loaded["fc.weight"].dtype == torch.bfloat16
    assert loaded["bn.num_batches_tracked"].dtype == torch.int64
    assert loaded["bn.num_batches_tracked"].item() == 7
    assert loaded["mask"].dtype == torch.bool


def test_non_contiguous_and_tied_tensors_are_written(tmp_path: Path) -> None:
    w = torch.randn(4, 6)
    state = {"a": w.t(), "b": w, "c": w}  # transposed view and tied weights
    save_state_dict(state, tmp_path)
    _assert_same(state, load_state_dict(tmp_path))


# --- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5GB", 5_000_000_000),
        ("500MB", 500_000_000),
        ("2GiB", 2 * 2**30),
        ("100KB", 100_000),
        ("1.5MB", 1_500_000),
        ("1.5 gb", 1_500_000_000),
        ("123", 123),
        (123, 123),
    ],
)
def test_parse_size(value: int | str, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["5 parsecs", "", "GB", "-1", "1e9", True])
def test_parse_size_invalid(value: object) -> None:
    with pytest.raises(ValueError, match="GiB"):
        parse_size(value)  # type: ignore[arg-type]


# --- hashing -----------------------------------------------------------------------------------


def test_sha256_of_file_matches_hashlib(tmp_path: Path) -> None:
    (path,) = save_state_dict(_state(), tmp_path)
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_sha256_of_dir_is_stable_and_tracks_shards(tmp_path: Path) -> None:
    state = {f"t{i}": torch.full((25,), float(i)) for i in range(4)}
    paths = save_state_dict(state, tmp_path, shard_size=200)
    first = checkpoint_sha256(tmp_path)
    assert checkpoint_sha256(tmp_path) == first
    assert len(first) == 64

    # Files outside the checkpoint do not count.
    (tmp_path / "README.md").write_text("notes")
    assert checkpoint_sha256(tmp_path) == first

    save_file({"t2": torch.zeros(25), "t3": torch.full((25,), 3.0)}, str(paths[1]))
    assert checkpoint_sha256(tmp_path) != first


# --- errors ------------------------------------------------------------------------------------


def _raises_with_path(path: Path, func=load_state_dict) -> str:
    with pytest.raises(MergeCliError) as info:
        func(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    msg = _raises_with_path(tmp_path / "runs" / "b.safetensors")
    assert "no such file" in msg
    assert "check the path" in msg


def test_empty_dir(tmp_path: Path) -> None:
    assert "no .safetensors file" in _raises_with_path(tmp_path)


def test_dir_with_two_safetensors_and_no_index(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "b.safetensors"))
    msg = _raises_with_path(tmp_path)
    assert "a.safetensors" in msg and "b.safetensors" in msg and "index" in msg


def test_index_with_missing_shard(tmp_path: Path) -> None:
    state = {f"t{i}": torch.zeros(25) for i in range(4)}
    paths = save_state_dict(state, tmp_path, shard_size=200)
    paths[1].unlink()
    msg = _raises_with_path(tmp_path)
    assert paths[1].name in msg and "missing" in msg


@pytest.mark.parametrize("content", ["{not json", json.dumps({"metadata": {}})])
def test_bad_index(tmp_path: Path, content: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(content)
    _raises_with_path(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "s2.safetensors"))
    weight_map = {"w": "s1.safetensors", "v": "s2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert "'w'" in _raises_with_path(tmp_path)


def test_truncated_file(tmp_path: Path) -> None:
    (path,) = save_state_dict(_state(), tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = _raises_with_path(path)
    assert "not a readable safetensors file" in msg and "re-download or re-save" in msg
    _raises_with_path(path, read_metadata)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(bytes(range(256)) * 8)
    assert "not a readable safetensors file" in _raises_with_path(path)


def test_pt_path(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(2)}, path)
    msg = _raises_with_path(path)
    assert "safetensors.torch.save_file(torch.load(f)" in msg


# --- atomic writing ----------------------------------------------------------------------------


def test_failure_on_second_shard_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = open
    calls = {"n": 0}

    def flaky_open(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(writer_mod, "open", flaky_open, raising=False)
    state = {f"t{i}": torch.zeros(25) for i in range(4)}
    with pytest.raises(MergeCliError, match="cannot write the output directory"):
        save_state_dict(state, tmp_path / "out", shard_size=200)
    assert _final_and_temp_files(tmp_path / "out") == []


def test_failure_during_renames_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace
    calls = {"n": 0}

    def flaky_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(writer_mod.os, "replace", flaky_replace)
    state = {f"t{i}": torch.zeros(25) for i in range(4)}
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_state_dict(state, tmp_path, shard_size=200)
    assert _final_and_temp_files(tmp_path) == []


def test_unwritable_out_dir(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    out = tmp_path / "afile" / "out"
    with pytest.raises(MergeCliError) as info:
        save_state_dict(_state(), out)
    msg = str(info.value)
    assert str(out) in msg and "cannot write the output directory" in msg and "\n" not in msg
