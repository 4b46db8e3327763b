"""Tests for mergecli.data: bundled MNIST, tensor files, python factories, subsets, batches."""

from __future__ import annotations

import gzip
import struct
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import ROOT
from mergecli.data import TensorData, load_data, mnist_arrays
from mergecli.data.mnist import parse_idx_images, parse_idx_labels
from mergecli.data.sources import example_shape
from mergecli.errors import MergeCliError

WHERE = "data.fit"


def expect_error(spec: dict, *needles: str, seed: int = 0) -> str:
    """Load ``spec`` expecting a one-line MergeCliError that names ``where`` and each needle."""
    with pytest.raises(MergeCliError) as info:
        load_data(spec, seed=seed, where=WHERE)
    message = str(info.value)
    assert "\n" not in message
    assert WHERE in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


@pytest.fixture
def isolated_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo load_data's sys.path insertion of the working directory after each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


# --- bundled MNIST -----------------------------------------------------------------------------


def test_mnist_arrays_parse_bundled_files() -> None:
    images, labels = mnist_arrays()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == 10000 and len(counts) == 10 and (counts > 0).all()
    assert mnist_arrays() is mnist_arrays()  # cached
    assert not images.flags.writeable


def test_idx_parsers_reject_bad_magic_and_size() -> None:
    good = struct.pack(">IIII", 2051, 2, 2, 2) + bytes(8)
    assert parse_idx_images(good).shape == (2, 2, 2)
    with pytest.raises(MergeCliError, match="magic number 2049, expected 2051"):
        parse_idx_images(struct.pack(">IIII", 2049, 2, 2, 2) + bytes(8))
    with pytest.raises(MergeCliError, match="implies 24"):
        parse_idx_images(good[:-1])
    assert parse_idx_labels(struct.pack(">II", 2049, 3) + bytes(3)).shape == (3,)
    with pytest.raises(MergeCliError, match="expected 2049"):
        parse_idx_labels(struct.pack(">II", 2051, 3) + bytes(3))
    with pytest.raises(MergeCliError, match="truncated"):
        parse_idx_labels(b"\x00")
    # The bundled files really are gzipped idx files with the expected header.
    bundled = ROOT / "src/mergecli/data/bundled/t10k-labels-idx1-ubyte.gz"
    assert struct.unpack(">II", gzip.decompress(bundled.read_bytes())[:8]) == (2049, 10000)


def test_mnist_splits() -> None:
    train = load_data({"source": "mnist", "split": "train"})
    test = load_data({"source": "mnist", "split": "test"})
    default = load_data({"source": "mnist"})
    first = load_data({"source": "mnist", "split": "0:8000"})
    assert len(train) == 8000 and len(test) == 2000
    assert train.x.shape == (8000, 1, 28, 28) and train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64 and train.y.shape == (8000,)
    assert torch.equal(train.x, first.x) and torch.equal(train.y, first.y)
    assert torch.equal(default.y, train.y)
    # Disjoint: together they are exactly "all", in order.
    everything = load_data({"source": "mnist", "split": "all"})
    assert torch.equal(torch.cat([train.x, test.x]), everything.x)
    assert torch.equal(torch.cat([train.y, test.y]), everything.y)
    _, labels = mnist_arrays()
    assert torch.equal(test.y, torch.from_numpy(labels[8000:].astype(np.int64)))


def test_mnist_normalisation() -> None:
    x = load_data({"source": "mnist", "split": "all"}).x
    assert abs(float(x.mean())) < 0.05
    assert abs(float(x.std()) - 1.0) < 0.05
    # Background pixels map to -mean/std.
    assert float(x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)


def test_mnist_slice_forms() -> None:
    head = load_data({"source": "mnist", "split": ":500"})
    tail = load_data({"source": "mnist", "split": "9000:"})
    neg = load_data({"source": "mnist", "split": "-1000:"})
    assert len(head) == 500 and len(tail) == 1000
    assert torch.equal(tail.y, neg.y)
    everything = load_data({"source": "mnist", "split": "all"})
    assert torch.equal(head.y, everything.y[:500])
    assert torch.equal(tail.x, everything.x[9000:])


# --- tensors and python sources ----------------------------------------------------------------


def test_tensors_source_safetensors(tmp_path: Path) -> None:
    x = torch.randint(0, 255, (30, 3, 4), dtype=torch.uint8)
    y = torch.arange(30) % 3
    path = tmp_path / "d.safetensors"
    save_file({"x": x, "y": y.to(torch.int32)}, str(path))
    data = load_data({"source": "tensors", "path": str(path)})
    assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
    assert torch.equal(data.x, x.float()) and torch.equal(data.y, y)
    part = load_data({"source": "tensors", "path": str(path), "split": "10:20"})
    assert torch.equal(part.y, y[10:20])


def test_tensors_source_npz_custom_keys(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    images = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float64)
    np.savez(path, images=images, targets=np.arange(20, dtype=np.int16) % 4)
    data = load_data({"source": "tensors", "path": str(path), "x": "images", "y": "targets"})
    assert data.x.shape == (20, 5) and data.x.dtype == torch.float32
    assert data.y.tolist() == [i % 4 for i in range(20)]
    # Whole-number float labels are accepted as class ids.
    np.savez(path, x=images, y=(np.arange(20) % 2).astype(np.float32))
    assert load_data({"source": "tensors", "path": str(path)}).y.dtype == torch.int64


def test_python_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_path: None
) -> None:
    (tmp_path / "mydata_ok.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Pairs(torch.utils.data.Dataset):
                def __init__(self, n):
                    self.n = n
                def __len__(self):
                    return self.n
                def __getitem__(self, i):
                    return torch.full((2, 3), float(i)), torch.tensor(i % 3)

            def make(n=4, as_list=False):
                if as_list:
                    return [([float(i), 1.0], i % 2) for i in range(n)]
                return Pairs(n)
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    data = load_data({"source": "python", "factory": "mydata_ok:make", "args": {"n": 7}})
    assert data.x.shape == (7, 2, 3) and data.x.dtype == torch.float32
    assert data.y.tolist() == [i % 3 for i in range(7)]
    plain = load_data(
        {"source": "python", "factory": "mydata_ok:make", "args": {"n": 5, "as_list": True}}
    )
    assert plain.x.shape == (5, 2) and plain.y.tolist() == [0, 1, 0, 1, 0]


# --- subsets -----------------------------------------------------------------------------------


def test_classes_filter() -> None:
    data = load_data({"source": "mnist", "split": "test", "classes": [3, 7]})
    assert set(data.y.tolist()) == {3, 7}
    full = load_data({"source": "mnist", "split": "test"})
    assert len(data) == int(((full.y == 3) | (full.y == 7)).sum())


def test_balanced() -> None:
    data = load_data({"source": "mnist", "split": "test", "balanced": True}, seed=1)
    counts = torch.bincount(data.y, minlength=10)
    full = torch.bincount(load_data({"source": "mnist", "split": "test"}).y, minlength=10)
    assert (counts == full.min()).all()
    both = load_data({"source": "mnist", "classes": [0, 1], "balanced": True})
    zeros, ones = torch.bincount(both.y).tolist()
    assert zeros == ones > 0


def test_fraction_reproducible() -> None:
    spec = {"source": "mnist", "split": "train", "fraction": 0.1}
    a = load_data(spec, seed=0)
    torch.manual_seed(123)  # global RNG state must not matter
    b = load_data(spec, seed=0)
    c = load_data(spec, seed=1)
    assert len(a) == 800 and len(c) == 800
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.y, c.y)
    assert len(load_data({**spec, "fraction": 1.0})) == 8000


# --- batches -----------------------------------------------------------------------------------


def small_data(n: int = 10) -> TensorData:
    return TensorData(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n))


def test_batch_sizes() -> None:
    data = small_data(10)
    assert [len(yb) for _, yb in data.batches(4)] == [4, 4, 2]
    assert [len(yb) for _, yb in data.batches(4, drop_last=True)] == [4, 4]
    assert [len(yb) for _, yb in data.batches(5, drop_last=True)] == [5, 5]
    assert list(data.batches(11, drop_last=True)) == []
    xb, yb = next(data.batches(3))
    assert xb.shape == (3, 1) and yb.tolist() == [0, 1, 2]
    with pytest.raises(MergeCliError, match="batch_size"):
        next(data.batches(0))


def test_batch_shuffle_covers_each_index_once() -> None:
    data = small_data(103)
    gen = torch.Generator().manual_seed(5)
    epochs = []
    for _ in range(2):
        seen = [yb for _, yb in data.batches(16, shuffle=True, generator=gen)]
        order = torch.cat(seen)
        assert sorted(order.tolist()) == list(range(103))
        epochs.append(order)
        # x and y stay paired after shuffling.
        xs = torch.cat([xb for xb, _ in data.batches(16, shuffle=True)])
        assert sorted(xs.flatten().long().tolist()) == list(range(103))
    assert not torch.equal(epochs[0], epochs[1])  # a new order each epoch
    again = torch.Generator().manual_seed(5)
    replay = torch.cat([yb for _, yb in data.batches(16, shuffle=True, generator=again)])
    assert torch.equal(replay, epochs[0])
    for xb, yb in data.batches(16, shuffle=True, generator=again):
        assert torch.equal(xb.squeeze(1).long(), yb)


# --- errors ------------------------------------------------------------------------------------


def test_error_unknown_source() -> None:
    expect_error({"source": "imagenet"}, "imagenet", "mnist, tensors, python")
    expect_error({}, "source")


@pytest.mark.parametrize("split", ["training", "1:2:3", "a:b", 5])
def test_error_bad_split(split: object) -> None:
    expect_error({"source": "mnist", "split": split}, "split", str(split))


@pytest.mark.parametrize("split", ["0:80000", "-20000:", "500:100", "5:5"])
def test_error_split_out_of_range_or_empty(split: str) -> None:
    expect_error({"source": "mnist", "split": split}, "split", split)


def test_error_tensors_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    expect_error({"source": "tensors", "path": str(missing)}, str(missing), "not found")
    expect_error({"source": "tensors"}, "path")
    expect_error({"source": "tensors", "path": str(tmp_path / "d.pt")}, ".safetensors")


def test_error_corrupt_files(tmp_path: Path) -> None:
    for name in ("bad.safetensors", "bad.npz"):
        path = tmp_path / name
        path.write_bytes(b"this is not a tensor file at all")
        expect_error({"source": "tensors", "path": str(path)}, str(path), "cannot read")


def test_tensors_source_attention_mask(tmp_path: Path) -> None:
    """`mask:` names the attention mask of token ids; it follows the split and the subsets,
    and batches carry it with the ids."""
    ids = torch.randint(1, 50, (12, 5))
    mask = (torch.arange(5)[None, :] < (5 - torch.arange(12) % 3)[:, None]).to(torch.uint8)
    y = torch.arange(12) % 2
    path = tmp_path / "tokens.safetensors"
    save_file({"ids": ids, "am": mask, "y": y}, str(path))
    spec = {"source": "tensors", "path": str(path), "x": "ids", "mask": "am", "split": "2:12"}
    data = load_data(spec)
    assert data.x.dtype == torch.int64 and data.mask.dtype == torch.int64
    assert torch.equal(data.mask, mask[2:].long()) and torch.equal(data.x, ids[2:])
    only = load_data({**spec, "classes": [1]})
    assert torch.equal(only.mask, mask[3::2].long()) and torch.equal(only.x, ids[3::2])
    x, labels = next(data.batches(4))
    assert torch.equal(x.ids, ids[2:6]) and torch.equal(x.mask, mask[2:6].long())
    assert torch.equal(labels, y[2:6])
    assert load_data({**spec, "mask": None}).mask is None


def test_error_attention_mask(tmp_path: Path) -> None:
    path = tmp_path / "tokens.npz"
    ids = np.ones((4, 3), dtype=np.int64)
    y = np.zeros(4, dtype=np.int64)
    np.savez(path, x=ids, y=y, mask=np.ones((4, 2)), half=np.full((4, 3), 0.5), m=ids)
    spec = {"source": "tensors", "path": str(path), "mask": "mask"}
    expect_error(spec, "data.fit.mask", "(4, 2)", "(4, 3)", "one entry per token")
    expect_error({**spec, "mask": "half"}, "data.fit.mask", "other than 0 and 1")
    expect_error({**spec, "mask": "absent"}, "data.fit.mask", "'absent'", "keys present")
    # validate reads the headers alone, and finds the same problems there.
    with pytest.raises(MergeCliError, match=r"data.fit.mask: 'mask' .* has shape \(4, 2\)"):
        example_shape(spec, where=WHERE)
    with pytest.raises(MergeCliError, match="data.fit.mask: key 'absent' not in"):
        example_shape({**spec, "mask": "absent"}, where=WHERE)
    assert example_shape({**spec, "mask": "m"}, where=WHERE) == [3]
    np.savez(path, x=np.ones((4, 3), dtype=np.float32), y=y, m=ids)
    expect_error({**spec, "mask": "m"}, "data.fit.mask", "goes with token ids", "float32")


def test_error_key_missing(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save_file({"images": torch.zeros(4, 2), "labels": torch.zeros(4, dtype=torch.long)}, str(path))
    expect_error(
        {"source": "tensors", "path": str(path)}, "'x'", str(path), "images, labels", "data.fit.x"
    )
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.zeros((4, 2)), labels=np.zeros(4))
    expect_error({"source": "tensors", "path": str(npz), "y": "targets"}, "'targets'", "labels, x")


def test_error_bad_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 2)), y=np.zeros(3, dtype=np.int64))
    expect_error({"source": "tensors", "path": str(path)}, "different lengths", str(path))
    np.savez(path, x=np.zeros((4, 2)), y=np.array([0.0, 0.5, 1.0, 2.0]))
    expect_error({"source": "tensors", "path": str(path)}, "non-integer", "data.fit.y")
    np.savez(path, x=np.zeros((4, 2)), y=np.zeros((4, 10), dtype=np.int64))
    expect_error({"source": "tensors", "path": str(path)}, "1-D", "data.fit.y", "(4, 10)")


def test_error_python_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_path: None
) -> None:
    (tmp_path / "mydata_bad.py").write_text(
        textwrap.dedent(
            """
            def boom():
                raise ValueError("no data here")

            def singles():
                return [1.0, 2.0]

            def float_labels():
                return [([1.0], 0.5)]

            def ragged():
                return [([1.0], 0), ([1.0, 2.0], 1)]

            def empty():
                return []
            """
        )
    )
    (tmp_path / "mydata_broken.py").write_text("import does_not_exist_anywhere_xyz\n")
    monkeypatch.chdir(tmp_path)

    def spec(factory: str) -> dict:
        return {"source": "python", "factory": factory}

    expect_error(spec("no_such_module_xyz:make"), "no_such_module_xyz", "ModuleNotFoundError")
    expect_error(spec("mydata_broken:make"), "mydata_broken", "does_not_exist_anywhere_xyz")
    expect_error(spec("mydata_bad:missing"), "'missing'", "mydata_bad")
    expect_error(spec("mydata_bad"), "factory", "package.module:function")
    expect_error(spec("mydata_bad:boom"), "ValueError", "no data here")
    expect_error(spec("mydata_bad:singles"), "item 0", "(input, label)")
    expect_error(spec("mydata_bad:float_labels"), "label", "ints")
    expect_error(spec("mydata_bad:ragged"), "same shape")
    expect_error(spec("mydata_bad:empty"), "empty")


def test_error_empty_after_subset() -> None:
    message = expect_error(
        {"source": "mnist", "split": "test", "classes": [11]},
        "classes=[11]",
        "labels present: 0..9",
        "widen the subset",
    )
    assert message.startswith("data.fit: no examples left")
    expect_error({"source": "mnist", "split": ":100", "fraction": 0.001}, "fraction", "rounds to 0")
    expect_error({"source": "mnist", "fraction": 1.5}, "data.fit.fraction")
    expect_error({"source": "mnist", "classes": "3"}, "data.fit.classes")
    expect_error({"source": "mnist", "balanced": "yes"}, "data.fit.balanced")


def test_class_fractions_keep_that_share_of_each_named_class() -> None:
    """{"5-9": 0.1}: every example of 0-4, and of each of 5-9 round(0.1 n) (half up) of its n,
    drawn from that class (each kept example is one of the originals), seeded."""
    full = load_data({"source": "mnist", "split": "train"})
    spec = {"source": "mnist", "split": "train", "class_fractions": {"5-9": 0.1}}
    data = load_data(spec, seed=0)
    n = torch.bincount(full.y, minlength=10).tolist()
    expected = [n[c] if c < 5 else int(np.floor(0.1 * n[c] + 0.5)) for c in range(10)]
    assert torch.bincount(data.y, minlength=10).tolist() == expected
    # The kept rows are rows of the full set with their own label.
    flat_full = full.x.reshape(len(full), -1)
    for i in (0, len(data) // 2, len(data) - 1):
        same = (flat_full == data.x[i].reshape(1, -1)).all(dim=1)
        assert same.any() and int(full.y[same][0]) == int(data.y[i])
    assert torch.equal(load_data(spec, seed=0).x, data.x)  # seeded
    assert not torch.equal(load_data(spec, seed=1).x, data.x)  # another seed, other rows
    # Single labels and lists as keys, and shares that keep at least one example.
    mixed = load_data(
        {"source": "mnist", "split": ":200", "class_fractions": {3: 0.5, "0,1": 1e-6}}
    )
    small = torch.bincount(load_data({"source": "mnist", "split": ":200"}).y, minlength=10)
    counts = torch.bincount(mixed.y, minlength=10)
    assert counts[0] == counts[1] == 1
    assert counts[3] == int(np.floor(0.5 * int(small[3]) + 0.5))
    assert torch.equal(counts[4:], small[4:]) and counts[2] == small[2]


def test_class_fractions_errors() -> None:
    expect_error(
        {"source": "mnist", "class_fractions": {"5-9": 1.5}}, "class_fractions.5-9", "(0, 1]"
    )
    expect_error(
        {"source": "mnist", "class_fractions": {"5-9": 0.1, 7: 0.5}}, "label 7 is named twice"
    )
    expect_error({"source": "mnist", "class_fractions": {"x": 0.5}}, "class_fractions.x")
    expect_error({"source": "mnist", "class_fractions": [5, 6]}, "class_fractions")


def test_class_fractions_in_a_recipe_data_spec() -> None:
    from pydantic import ValidationError

    from mergecli.recipe import DataSpec

    ok = DataSpec.model_validate({"source": "mnist", "class_fractions": {"0-4": 0.1}})
    assert ok.class_fractions == {"0-4": 0.1}
    with pytest.raises(ValidationError, match="expected a share in"):
        DataSpec.model_validate({"source": "mnist", "class_fractions": {"0-4": 0}})
    with pytest.raises(ValidationError, match="class_fractions"):
        DataSpec.model_validate({"source": "text", "path": "t.txt", "class_fractions": {1: 0.5}})
