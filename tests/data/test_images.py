"""Image sources read from files written in the exact on-disk layouts (tests/fixtures/images.py,
independent of the readers): pixels and labels round-trip exactly; transforms against their
formulas; augmentation only where asked, seeded; bad layouts and images refused in one line."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures.images import write_cifar, write_imagefolder
from mergecli.data import load_data
from mergecli.data.cifar import CifarUnpickler
from mergecli.data.transforms import PRESETS, BatchTransform, parse_transform
from mergecli.errors import MergeCliError


@pytest.fixture(scope="module")
def cifar_roots(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each dataset in each version: (root, what was written)."""
    out = {}
    for dataset in ("cifar10", "cifar100"):
        for version in ("binary", "python"):
            root = tmp_path_factory.mktemp(f"{dataset}-{version}")
            out[(dataset, version)] = (root, write_cifar(root, dataset, version, per_file=40))
    return out


@pytest.mark.parametrize("version", ["binary", "python"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_pixels_and_labels_round_trip(cifar_roots, version: str, split: str) -> None:
    root, written = cifar_roots[("cifar10", version)]
    data = load_data({"source": "cifar10", "root": str(root), "split": split})
    images, labels, _ = written[split]
    assert data.x.dtype == torch.uint8 and data.y.dtype == torch.int64
    assert len(data) == (200 if split == "train" else 40)
    assert torch.equal(data.x, torch.from_numpy(images))
    assert torch.equal(data.y, torch.from_numpy(labels).long())
    # Inputs are the pixels in [0, 1], CHW, before any transform.
    assert torch.equal(data.inputs(), torch.from_numpy(images).float() / 255)


@pytest.mark.parametrize("version", ["binary", "python"])
@pytest.mark.parametrize("labels", ["fine", "coarse"])
def test_cifar100_fine_and_coarse_labels(cifar_roots, version: str, labels: str) -> None:
    root, written = cifar_roots[("cifar100", version)]
    data = load_data({"source": "cifar100", "root": str(root), "split": "test", "labels": labels})
    images, fine, coarse = written["test"]
    assert torch.equal(data.x, torch.from_numpy(images))
    expected = fine if labels == "fine" else coarse
    assert torch.equal(data.y, torch.from_numpy(expected).long())


def test_root_may_be_the_layout_directory_itself(cifar_roots) -> None:
    root, written = cifar_roots[("cifar10", "binary")]
    data = load_data({"source": "cifar10", "root": str(root / "cifar-10-batches-bin")})
    assert torch.equal(data.x, torch.from_numpy(written["train"][0]))


def test_subset_options_compose(cifar_roots) -> None:
    root, written = cifar_roots[("cifar10", "python")]
    spec = {"source": "cifar10", "root": str(root), "classes": [1, 2, 3], "balanced": True}
    data = load_data({**spec, "fraction": 0.5}, seed=3)
    labels = torch.from_numpy(written["train"][1]).long()
    per_class = int(min((labels == c).sum() for c in (1, 2, 3)))
    assert set(data.y.tolist()) <= {1, 2, 3}
    assert len(data) == round(0.5 * 3 * per_class)
    # Each kept example is the image of its source row.
    images = torch.from_numpy(written["train"][0])
    assert torch.equal(data.x, images[data.rows])
    assert torch.equal(data.y, labels[data.rows])


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": Planted(), b"labels": []}, protocol=2))
    with pytest.raises(MergeCliError) as caught:
        load_data({"source": "cifar10", "root": str(tmp_path)})
    message = str(caught.value)
    assert "refused to load" in message and ("posix.system" in message or "os.system" in message)
    assert "\n" not in message
    assert not marker.exists()


def test_the_unpickler_admits_numpy_arrays_only() -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (2, 4, 5):
        loaded = CifarUnpickler(
            __import__("io").BytesIO(pickle.dumps({b"data": array}, protocol=protocol)),
            encoding="bytes",
        ).load()
        assert np.array_equal(loaded[b"data"], array)
    payload = pickle.dumps(eval, protocol=4)  # builtins.eval
    with pytest.raises(MergeCliError, match="builtins.eval"):
        CifarUnpickler(__import__("io").BytesIO(payload)).load()


def test_imagefolder_png_round_trip_and_named_classes(tmp_path: Path) -> None:
    written = write_imagefolder(tmp_path, {"zebra": 3, "ant": 2, "bee": 4}, size=(7, 5))
    data = load_data({"source": "imagefolder", "root": str(tmp_path)})
    # Classes sorted by name: ant 0, bee 1, zebra 2; files sorted within each.
    assert data.y.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    expected = [p for name in ("ant", "bee", "zebra") for p in written[name]]
    assert data.x.shape == (9, 3, 5, 7)
    for got, pixels in zip(data.x, expected, strict=True):
        assert torch.equal(got, torch.from_numpy(pixels).permute(2, 0, 1))
    named = load_data({"source": "imagefolder", "root": str(tmp_path), "classes": ["zebra", 0]})
    assert named.y.tolist() == [0, 0, 2, 2, 2]
    assert torch.equal(named.x[2:], data.x[6:])


def test_imagefolder_jpeg_grayscale_and_workers(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, {"a": 3, "b": 3}, size=(9, 9), suffix=".jpg", seed=1)
    files = sorted(tmp_path.rglob("*.jpg"))
    # JPEG is lossy: the reference is Pillow's own decoding of each file, converted to L.
    expected = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("L"))) for f in files])
    spec = {"source": "imagefolder", "root": str(tmp_path), "mode": "L"}
    serial = load_data(spec)
    assert torch.equal(serial.x, expected[:, None])
    pooled = load_data({**spec, "workers": 2})
    assert torch.equal(pooled.x, serial.x) and torch.equal(pooled.y, serial.y)


def test_only_the_chosen_images_are_decoded(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, {"good": 2, "bad": 2})
    (tmp_path / "bad" / "img_0.png").write_bytes(b"not an image")
    data = load_data({"source": "imagefolder", "root": str(tmp_path), "classes": ["good"]})
    assert len(data) == 2


def test_resize_and_center_crop_give_a_common_size(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, {"class_a": 1}, size=(20, 10))
    write_imagefolder(tmp_path, {"class_b": 1}, size=(12, 16))
    spec = {"source": "imagefolder", "root": str(tmp_path)}
    data = load_data({**spec, "transform": [{"resize": 8}, {"center_crop": 6}]})
    assert data.x.shape == (2, 3, 6, 6)
    with pytest.raises(MergeCliError) as caught:
        load_data({**spec, "transform": [{"resize": 8}]})
    message = str(caught.value)
    for needle in ("different sizes", "class_a/img_0.png", "16x8", "class_b/img_0.png", "8x10"):
        assert needle in message, message


def test_resize_keeps_constant_images_and_follows_the_shorter_side_rule() -> None:
    from mergecli.data.transforms import resize, resized_size

    assert resized_size(32, 64, 128) == (32, 64) and resized_size(32, 90, 60) == (48, 32)
    x = torch.full((2, 3, 20, 30), 77, dtype=torch.uint8)
    assert torch.equal(resize(x, (10, 15)), torch.full((2, 3, 10, 15), 77, dtype=torch.uint8))
    # Antialiased bilinear is PIL's bilinear filter (stretched when shrinking): compared with
    # Pillow's resize of the same float image.
    y = torch.rand(1, 1, 23, 17, generator=torch.Generator().manual_seed(0))
    for size in ((9, 7), (40, 30)):
        image = Image.fromarray(y[0, 0].numpy(), mode="F")
        reference = np.array(image.resize(size[::-1], Image.Resampling.BILINEAR))
        assert torch.allclose(resize(y, size)[0, 0], torch.from_numpy(reference), atol=1e-5)


def test_center_crop_matches_the_slice(cifar_roots) -> None:
    root, written = cifar_roots[("cifar10", "binary")]
    spec = {"source": "cifar10", "root": str(root), "split": "test"}
    data = load_data({**spec, "transform": [{"center_crop": [24, 20]}]})
    images = torch.from_numpy(written["test"][0])
    assert torch.equal(data.x, images[:, :, 4:28, 6:26])


def test_normalize_is_x_minus_mean_over_std(cifar_roots) -> None:
    root, written = cifar_roots[("cifar10", "binary")]
    spec = {"source": "cifar10", "root": str(root), "split": "test"}
    data = load_data({**spec, "transform": [{"normalize": "cifar10"}]})
    mean, std = PRESETS["cifar10"]
    x = torch.from_numpy(written["test"][0]).double() / 255
    expected = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    got = torch.cat([b for b, _ in data.batches(16)])
    assert torch.allclose(got.double(), expected, atol=1e-5)
    custom = load_data({**spec, "transform": [{"normalize": {"mean": [0.5] * 3, "std": [2] * 3}}]})
    assert torch.allclose(custom.inputs().double(), (x - 0.5) / 2, atol=1e-6)


def test_hflip_twice_is_the_identity_and_flips_columns() -> None:
    from mergecli.data.transforms import hflip

    x = torch.rand(5, 3, 4, 6)
    flip = torch.tensor([True, False, True, True, False])
    once = hflip(x, flip)
    assert torch.equal(hflip(once, flip), x)
    assert torch.equal(once[0], x[0][:, :, torch.arange(5, -1, -1)]) and torch.equal(once[1], x[1])


def test_random_crop_is_a_window_of_the_zero_padded_image() -> None:
    from mergecli.data.transforms import random_crop

    x = torch.rand(6, 3, 5, 7)
    offsets = torch.tensor([[0, 1, 2, 3, 4, 2], [4, 3, 2, 1, 0, 0]])
    got = random_crop(x, 2, offsets)
    for i in range(6):
        padded = torch.zeros(3, 9, 11)
        padded[:, 2:7, 2:9] = x[i]
        top, left = offsets[:, i].tolist()
        assert torch.equal(got[i], padded[:, top : top + 5, left : left + 7])
    steps = parse_transform([{"random_crop": [5, 7]}])  # padding 0: the identity
    assert torch.equal(BatchTransform(steps, augment=True)(x, train=True), x)


AUGMENTED = [{"random_crop": 32, "padding": 4}, {"hflip": 0.5}, {"normalize": "cifar10"}]


def test_augmentation_is_seeded_and_only_in_training_passes(cifar_roots) -> None:
    root, _ = cifar_roots[("cifar10", "binary")]
    spec = {"source": "cifar10", "root": str(root), "transform": AUGMENTED}
    plain = load_data(spec)
    data = load_data({**spec, "augment": True})

    def epoch(d, seed):
        generator = torch.Generator().manual_seed(seed)
        return [(x, y) for x, y in d.batches(32, shuffle=True, generator=generator)]

    first, again, other = epoch(data, 0), epoch(data, 0), epoch(data, 1)
    unaugmented = epoch(plain, 0)

    def same(a, b, part):
        return all(torch.equal(p[part], q[part]) for p, q in zip(a, b, strict=True))

    assert same(first, again, 0) and same(first, again, 1)
    assert not same(first, other, 0)
    # The same shuffle without augmentation: the plain inputs in that order.
    assert same(first, unaugmented, 1) and not same(first, unaugmented, 0)
    # Passes in order (evaluation, statistics) and inputs() never augment.
    in_order = torch.cat([x for x, _ in data.batches(32)])
    assert torch.equal(in_order, data.inputs()) and torch.equal(in_order, plain.inputs())


def test_a_ranks_share_is_that_of_the_one_process_batch(cifar_roots) -> None:
    root, _ = cifar_roots[("cifar10", "python")]
    data = load_data(
        {"source": "cifar10", "root": str(root), "transform": AUGMENTED, "augment": True}
    )

    def epoch(part):
        generator = torch.Generator().manual_seed(5)
        return [x for x, _ in data.batches(30, shuffle=True, generator=generator, part=part)]

    whole = epoch(None)
    shares = [epoch((rank, 3)) for rank in range(3)]
    for i, batch in enumerate(whole):
        assert torch.equal(torch.cat([shares[r][i] for r in range(3)]), batch)


@pytest.mark.parametrize(
    ("transform", "augment", "needle"),
    [
        ([{"hflip": 0.5}, {"resize": 8}], False, "resize after hflip"),
        ([{"random_crop": 28, "padding": 4}], False, "random_crop 28x28 on images of 32x32"),
        ([{"normalize": "mnist"}], False, "1 means for images of 3 channel(s)"),
        ([{"normalize": "cifar11"}], False, "unknown preset 'cifar11'"),
        ([{"normalize": "cifar10"}], True, "no random step"),
        ([{"resize": 8, "hflip": 0.5}], False, "names 2 steps"),
        ([{"center_crop": 40}], False, "center_crop 40x40 is larger than"),
    ],
)
def test_bad_transforms_are_one_line(cifar_roots, transform, augment, needle) -> None:
    root, _ = cifar_roots[("cifar10", "binary")]
    spec = {"source": "cifar10", "root": str(root), "transform": transform, "augment": augment}
    with pytest.raises(MergeCliError) as caught:
        load_data(spec, where="data.fit")
    assert needle in str(caught.value) and "\n" not in str(caught.value), caught.value
    assert str(caught.value).startswith("data.fit."), caught.value


def test_missing_and_broken_layouts(tmp_path: Path) -> None:
    def error(spec) -> str:
        with pytest.raises(MergeCliError) as caught:
            load_data(spec, where="data.fit")
        assert "\n" not in str(caught.value)
        return str(caught.value)

    missing = error({"source": "cifar10", "root": str(tmp_path)})
    for needle in ("no cifar10 under", "cifar-10-batches-bin", "cifar-10-batches-py", "nothing is"):
        assert needle in missing, missing
    write_cifar(tmp_path, "cifar10", "binary", per_file=3)
    (tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin").unlink()
    assert "data_batch_3.bin missing" in error({"source": "cifar10", "root": str(tmp_path)})
    write_cifar(tmp_path / "c100", "cifar100", "binary", per_file=3)
    with open(tmp_path / "c100" / "cifar-100-binary" / "test.bin", "ab") as handle:
        handle.write(b"\0" * 10)
    line = error({"source": "cifar100", "root": str(tmp_path / "c100"), "split": "test"})
    assert "not a whole number of 3074-byte records" in line, line
    folder = tmp_path / "folder"
    write_imagefolder(folder, {"cat": 2, "dog": 2})
    spec = {"source": "imagefolder", "root": str(folder)}
    assert "no class 'cow'" in error({**spec, "classes": ["cow"]})
    (folder / "empty").mkdir()
    assert f"class folder {folder / 'empty'} holds no images" in error(spec)
    (folder / "empty").rmdir()
    (folder / "dog" / "img_1.png").write_bytes(b"\x89PNG broken")
    assert f"cannot decode image {folder / 'dog' / 'img_1.png'}" in error(spec)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "a.png")
    assert "has no class folders (it holds images such as a.png directly)" in error(
        {"source": "imagefolder", "root": str(flat)}
    )


def test_missing_pillow_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    write_imagefolder(tmp_path, {"a": 1})
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)
    with pytest.raises(MergeCliError, match=r"pip install 'mergecli\[images\]'"):
        load_data({"source": "imagefolder", "root": str(tmp_path)})


def test_decoded_images_are_cached_by_the_files(tmp_path: Path, monkeypatch) -> None:
    from mergecli.data import imagefolder

    folder = tmp_path / "folder"
    write_imagefolder(folder, {"a": 2, "b": 3}, size=(6, 4))
    cache = tmp_path / "cache"
    spec = {"source": "imagefolder", "root": str(folder), "cache": str(cache)}
    first = load_data({**spec, "transform": [{"resize": [3, 5]}]})
    assert len(list(cache.glob("*.safetensors"))) == 1
    real_decode = imagefolder.decode

    def refuse(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(imagefolder, "decode", refuse)
    again = load_data({**spec, "transform": [{"resize": [3, 5]}]})
    assert torch.equal(again.x, first.x) and torch.equal(again.y, first.y)
    # Another subset, other steps or a changed file: decoded again, each its own entry.
    monkeypatch.setattr(imagefolder, "decode", real_decode)
    load_data({**spec, "classes": ["b"], "transform": [{"resize": [3, 5]}]})
    load_data(spec)
    Image.new("RGB", (6, 4), (9, 9, 9)).save(folder / "a" / "img_0.png")
    changed = load_data({**spec, "transform": [{"resize": [3, 5]}]})
    assert len(list(cache.glob("*.safetensors"))) == 4
    assert not torch.equal(changed.x[0], first.x[0]) and torch.equal(changed.x[1:], first.x[1:])


def test_the_recipe_refuses_augmenting_evaluation_and_misplaced_keys() -> None:
    from pydantic import ValidationError

    from mergecli.recipe.schema import DataSection

    spec = {"source": "cifar10", "root": "r", "transform": AUGMENTED, "augment": True}
    DataSection.model_validate({"fit": spec})
    for section in ({"eval": spec}, {"eval": {"a": {**spec, "augment": False}, "b": spec}}):
        with pytest.raises(ValidationError, match="evaluation never augments"):
            DataSection.model_validate(section)
    bad = [
        ({**spec, "workers": 2}, "source 'cifar10' takes no workers"),
        ({"source": "mnist", "transform": AUGMENTED}, "source 'mnist' takes no transform"),
        ({"source": "imagefolder", "root": "r", "labels": "fine"}, "takes no labels"),
        ({"source": "cifar100", "root": "r", "split": "val"}, "splits train and test"),
        (
            {"source": "mnist", "classes": ["cat"]},
            "names only for sources imagefolder and hf_dataset",
        ),
        ({"source": "cifar10"}, "needs `root`"),
    ]
    for fit, needle in bad:
        with pytest.raises(ValidationError, match=needle):
            DataSection.model_validate({"fit": fit})
