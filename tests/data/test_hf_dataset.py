"""The `hf_dataset` source on datasets written here by `datasets` itself (save_to_disk of a
Dataset and of a DatasetDict, to_parquet): pixels, labels and token ids come back as written,
subsets choose rows before decoding, and bad input is one line naming what to fix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import stdlib_text, train_tokenizer
from mergecli.data import load_data
from mergecli.data.sources import example_dtype, example_shape
from mergecli.errors import MergeCliError

datasets = pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")
datasets.disable_progress_bars()

ROWS = 12
NAMES = ["cat", "dog", "emu"]


def pixels(rows: int = ROWS, channels: int = 3, size: tuple[int, int] = (6, 5), seed: int = 0):
    """(rows, H, W[, C]) uint8 images and their labels 0..2."""
    rng = np.random.default_rng(seed)
    shape = (rows, *size, channels) if channels > 1 else (rows, *size)
    return rng.integers(0, 256, size=shape, dtype=np.uint8), [i % 3 for i in range(rows)]


def image_dataset(images: np.ndarray, labels: list[int], class_label: bool = True):
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=NAMES) if class_label else datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a) for a in images], "label": labels}, features=features
    )


def chw(images: np.ndarray) -> torch.Tensor:
    """What the source should hold: (N, C, H, W) uint8."""
    x = torch.from_numpy(images)
    return x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)


def test_saved_images_and_labels_come_back_as_written(tmp_path: Path) -> None:
    images, labels = pixels()
    image_dataset(images, labels).save_to_disk(str(tmp_path / "ds"), num_shards=3)
    spec = {"source": "hf_dataset", "path": str(tmp_path / "ds")}
    data = load_data(spec)
    assert data.x.dtype == torch.uint8 and torch.equal(data.x, chw(images))
    assert data.y.tolist() == labels
    assert data.rows.tolist() == list(range(ROWS))
    # pixels in [0, 1] before a transform; normalize applies per channel to them
    assert torch.equal(data.features(), chw(images).float() / 255)
    mean, std = [0.5, 0.25, 0.1], [0.2, 0.3, 0.4]
    spec["transform"] = [{"normalize": {"mean": mean, "std": std}}]
    expected = (chw(images).float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
        :, None, None
    ]
    torch.testing.assert_close(load_data(spec).features(), expected, rtol=0, atol=1e-6)
    assert example_shape(spec) == [3, 6, 5] and example_dtype(spec) == torch.float32


def test_grayscale_mode_and_a_resize(tmp_path: Path) -> None:
    images, labels = pixels(channels=1, size=(7, 7))
    image_dataset(images, labels).save_to_disk(str(tmp_path / "ds"))
    spec = {"source": "hf_dataset", "path": str(tmp_path / "ds"), "mode": "L"}
    assert torch.equal(load_data(spec).x, chw(images))
    spec["transform"] = [{"resize": 4}]
    assert tuple(load_data(spec).x.shape) == (ROWS, 1, 4, 4)
    assert example_shape(spec) == [1, 4, 4]
    # RGB, the default, repeats a grayscale image over three channels (as Pillow converts)
    rgb = load_data({"source": "hf_dataset", "path": str(tmp_path / "ds")}).x
    assert torch.equal(rgb, chw(images).expand(-1, 3, -1, -1))


def test_a_dataset_dicts_split_and_parquet_files(tmp_path: Path) -> None:
    train, train_labels = pixels(seed=1)
    test, test_labels = pixels(rows=6, seed=2)
    splits = {"train": image_dataset(train, train_labels), "test": image_dataset(test, test_labels)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dict"))
    spec = {"source": "hf_dataset", "path": str(tmp_path / "dict")}
    assert torch.equal(load_data(spec).x, chw(train))  # train by default
    assert torch.equal(load_data({**spec, "split": "test"}).x, chw(test))
    folder = tmp_path / "parquet"
    folder.mkdir()
    for i in range(2):  # the files read in name order, their rows one after the other
        splits["train"].shard(2, i, contiguous=True).to_parquet(str(folder / f"train-{i}.parquet"))
    splits["test"].to_parquet(str(folder / "test-0.parquet"))
    for path in (folder / "train-*.parquet", folder / "train-0.parquet", folder):
        data = load_data({"source": "hf_dataset", "path": str(path)})
        expected = {
            "train-0.parquet": train[: ROWS // 2],
            "parquet": np.concatenate([test, train]),
        }.get(path.name, train)
        assert torch.equal(data.x, chw(expected)), path


def test_subsets_choose_rows_before_decoding_and_classes_take_names(tmp_path: Path) -> None:
    images, labels = pixels()
    image_dataset(images, labels).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "plain").mkdir()
    image_dataset(images, labels, class_label=False).save_to_disk(str(tmp_path / "plain"))
    spec = {"source": "hf_dataset", "path": str(tmp_path / "ds"), "classes": ["dog", 2]}
    data = load_data(spec)
    kept = [i for i, label in enumerate(labels) if label in (1, 2)]
    assert data.rows.tolist() == kept and data.y.tolist() == [labels[i] for i in kept]
    assert torch.equal(data.x, chw(images[kept]))
    data = load_data({**spec, "classes": None, "fraction": 0.5}, seed=3)
    assert len(data) == ROWS // 2 and torch.equal(data.x, chw(images[data.rows.numpy()]))
    with pytest.raises(MergeCliError, match=r"no class 'yak' in column 'label' \(classes: cat"):
        load_data({**spec, "classes": ["yak"]})
    with pytest.raises(MergeCliError, match="'dog' is a name, but column 'label' is no Class"):
        load_data({**spec, "path": str(tmp_path / "plain")})


def write_tokenizer(folder: Path, pad: str | None = None, template: bool = False) -> Path:
    """The helpers' BPE tokenizer (EOS </s>), with a pad token or a post-processor that ends
    every text with </s>."""
    train_tokenizer(folder, stdlib_text(8000))
    if pad is not None:
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"eos_token": "</s>", "pad_token": pad})
        )
    if template:
        from tokenizers import Tokenizer, processors

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        eos = tokenizer.token_to_id("</s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", eos)]
        )
        tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def text_dataset(tmp_path: Path) -> tuple[Path, list[str], list[int]]:
    lines = [line for line in stdlib_text(4000).splitlines() if line.strip()][:10]
    labels = [i % 2 for i in range(len(lines))]
    path = tmp_path / "texts"
    datasets.Dataset.from_dict({"text": lines, "label": labels}).save_to_disk(str(path))
    return path, lines, labels


def expected_rows(folder: Path, lines: list[str], seq_len: int, pad: int, end: int | None):
    """Each line's ids from the tokenizer alone (no padding, no truncation set), cut to seq_len
    (``end``: the post-processor's last token kept) and padded with ``pad``; the mask."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids, mask = [], []
    for line in lines:
        row = tokenizer.encode(line, add_special_tokens=False).ids
        row = row[: seq_len - 1] + [end] if end is not None else row[:seq_len]
        ids.append(row + [pad] * (seq_len - len(row)))
        mask.append([1] * len(row) + [0] * (seq_len - len(row)))
    return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("case", ["pad is eos", "pad token", "post-processor"])
def test_text_rows_are_the_tokenizers_ids_cut_and_padded(tmp_path: Path, case: str) -> None:
    pytest.importorskip("tokenizers")
    pad_token = "<unk>" if case == "pad token" else None
    folder = write_tokenizer(tmp_path / "tok", pad=pad_token, template=case == "post-processor")
    path, lines, labels = text_dataset(tmp_path)
    seq_len = 12
    spec = {"source": "hf_dataset", "path": str(path), "tokenizer": str(folder), "seq_len": 12}
    data = load_data(spec)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = tokenizer.token_to_id("</s>")
    pad = tokenizer.token_to_id("<unk>") if case == "pad token" else eos
    ids, mask = expected_rows(
        folder, lines, seq_len, pad, eos if case == "post-processor" else None
    )
    assert data.x.dtype == torch.int64 and torch.equal(data.x, ids)
    assert torch.equal(data.mask, mask) and data.y.tolist() == labels
    assert bool((mask.sum(1) < seq_len).any()) and bool((mask.sum(1) == seq_len).any())
    batch = next(data.batches(4))[0]
    assert torch.equal(batch.ids, ids[:4]) and torch.equal(batch.mask, mask[:4])
    assert example_shape(spec) == [seq_len] and example_dtype(spec) == torch.int64


def test_task_lm_packs_the_texts_as_the_text_source_does(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    folder = write_tokenizer(tmp_path / "tok")
    path, lines, _ = text_dataset(tmp_path)
    spec = {"source": "hf_dataset", "path": str(path), "tokenizer": str(folder), "task": "lm"}
    data = load_data({**spec, "seq_len": 16})
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = tokenizer.token_to_id("</s>")
    tokens = [t for line in lines for t in [*tokenizer.encode(line).ids, eos]]
    blocks = len(tokens) // 16
    assert torch.equal(data.x, torch.tensor(tokens[: blocks * 16]).reshape(blocks, 16))
    assert data.mask is None and data.y.tolist() == [0] * blocks
    # the same documents as a text file give the same blocks
    (tmp_path / "docs.txt").write_text("\n\n".join(lines))
    text = {"source": "text", "path": str(tmp_path / "docs.txt"), "tokenizer": str(folder)}
    assert torch.equal(load_data({**text, "seq_len": 16, "cache": False}).x, data.x)
    with pytest.raises(MergeCliError, match="fewer than one block of seq_len 4096"):
        load_data({**spec, "seq_len": 4096})


def test_safety_state_json_cannot_point_outside_and_a_path_only_image_is_not_opened(
    tmp_path: Path,
) -> None:
    images, labels = pixels(rows=3)
    image_dataset(images, labels).save_to_disk(str(tmp_path / "ds"))
    state = json.loads((tmp_path / "ds" / "state.json").read_text())
    state["_data_files"] = [{"filename": "../elsewhere.arrow"}]
    (tmp_path / "ds" / "state.json").write_text(json.dumps(state))
    with pytest.raises(MergeCliError, match="names data file '../elsewhere.arrow', not a file"):
        load_data({"source": "hf_dataset", "path": str(tmp_path / "ds")})
    # a cell with a path and no bytes (datasets would open the path, even a URL): refused
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = [{"bytes": None, "path": "https://example.com/a.png"}]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image
    table = pa.table({"image": pa.array(cells, type=image_type), "label": [0]})
    pq.write_table(table, tmp_path / "refs.parquet")
    with pytest.raises(MergeCliError, match=r"row 0 .* holds only the path 'https://exam"):
        load_data({"source": "hf_dataset", "path": str(tmp_path / "refs.parquet")})


def message(spec: dict) -> str:
    with pytest.raises(MergeCliError) as info:
        load_data({"source": "hf_dataset", **spec})
    line = str(info.value)
    assert "\n" not in line
    return line


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    images, labels = pixels(rows=4)
    ds = image_dataset(images, labels)
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "valid": ds}).save_to_disk(str(tmp_path / "dict"))
    path = str(tmp_path / "ds")
    line = message({"path": str(tmp_path / "none")})
    assert line.startswith(f"data.path: no dataset at {tmp_path / 'none'}"), line
    line = message({"path": path, "label": "class"})
    assert "data.label: no column 'class' in" in line and "(columns: image, label)" in line
    line = message({"path": str(tmp_path / "dict"), "split": "test"})
    assert "data.split: no split 'test' in" in line and "(splits: train, valid)" in line, line
    assert "no splits; remove `split`" in message({"path": path, "split": "train"})
    floats = datasets.Dataset.from_dict({"image": [Image.fromarray(images[0])], "label": [0.5]})
    floats.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "floats"))
    line = message({"path": str(tmp_path / "floats")})
    assert "data.label: column 'label' of" in line and "holds double, not integer class ids" in line
    names = datasets.Dataset.from_dict({"text": ["a b"], "label": ["cat"]})
    names.save_to_disk(str(tmp_path / "names"))
    line = message({"path": str(tmp_path / "names")})
    assert "holds string, not integer class ids (encode the names" in line, line
    negative = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, -1]})
    negative.save_to_disk(str(tmp_path / "negative"))
    assert "label -1 in row 1 of" in message({"path": str(tmp_path / "negative")})
    line = message({"path": str(tmp_path / "names"), "image": "text"})
    assert "data.image: column 'text' of" in line and "not images" in line
    (tmp_path / "other").mkdir()
    line = message({"path": str(tmp_path / "other")})
    assert "holds neither a dataset saved by save_to_disk" in line
    line = message({"path": str(tmp_path / "negative"), "text": "label"})
    assert "data.text: column 'label'" in line and "not strings" in line, line


def test_a_corrupt_image_names_its_row(tmp_path: Path) -> None:
    images, labels = pixels(rows=5)
    ds = image_dataset(images, labels).cast_column("image", datasets.Image(decode=False))
    cells = ds["image"]
    cells = [dict(cell) for cell in cells]
    cells[3]["bytes"] = cells[3]["bytes"][:40]  # a truncated PNG
    broken = datasets.Dataset.from_dict({"image": cells, "label": labels}, features=ds.features)
    broken.save_to_disk(str(tmp_path / "ds"))
    line = message({"path": str(tmp_path / "ds")})
    assert line.startswith(f"data.image: cannot decode the image in row 3 of {tmp_path / 'ds'}")
    # the rows a subset leaves out are never decoded
    assert len(load_data({"source": "hf_dataset", "path": str(tmp_path / "ds"), "classes": [1]}))


def test_without_pyarrow_the_message_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    line = message({"path": str(tmp_path)})
    assert line == (
        "data: source 'hf_dataset' needs the datasets library (for pyarrow): "
        "pip install 'mergecli[hf-datasets]'"
    )


def test_a_pyarrow_that_unpickles_extension_types_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow

    monkeypatch.setattr(pyarrow, "__version__", "14.0.0")
    line = message({"path": str(tmp_path)})
    assert "needs pyarrow 14.0.1 or newer (this is 14.0.0" in line, line
    monkeypatch.setattr(pyarrow, "__version__", "14.0.1.dev3")
    assert "no dataset at" in message({"path": str(tmp_path / "none")})


def test_the_recipe_refuses_keys_that_do_not_go_together() -> None:
    from pydantic import ValidationError

    from mergecli.recipe.schema import DataSpec

    base = {"source": "hf_dataset", "path": "d"}
    DataSpec.model_validate({**base, "image": "img", "transform": [{"hflip": 0.5}]})
    DataSpec.model_validate({**base, "text": "review", "seq_len": 64, "classes": [0, "pos"]})
    bad = [
        ({"source": "hf_dataset"}, "needs `path`"),
        ({**base, "image": "a", "text": "b"}, "give `image` or `text`, not both"),
        ({**base, "text": "t", "transform": [{"hflip": 0.5}]}, "text column takes no transform"),
        ({**base, "image": "i", "seq_len": 8}, "image column takes no seq_len"),
        ({**base, "task": "lm", "classes": [1]}, "task lm has no labels"),
        ({**base, "max_tokens": 100}, "max_tokens caps the packed blocks of task lm"),
        ({**base, "augment": True}, "augment: true needs a random step"),
        ({**base, "root": "r"}, "source 'hf_dataset' takes no root"),
        ({"source": "cifar10", "root": "r", "label": "y"}, "source 'cifar10' takes no label"),
    ]
    for spec, needle in bad:
        with pytest.raises(ValidationError, match=needle):
            DataSpec.model_validate(spec)


def test_plots_name_the_saved_dataset_and_its_split() -> None:
    from mergecli.analyze.scoring import describe_data
    from mergecli.recipe.schema import DataSpec

    spec = {"source": "hf_dataset", "path": "data/cifar10", "split": "test", "classes": [0, 1]}
    assert describe_data(DataSpec.model_validate(spec)) == "cifar10 test, classes 0,1"
    image_folder = DataSpec.model_validate({"source": "imagefolder", "root": "data/val/"})
    assert describe_data(image_folder) == "val"
