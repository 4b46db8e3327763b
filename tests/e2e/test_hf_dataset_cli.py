"""`source: hf_dataset` run as a user runs it: a recipe that aligns, fits and evaluates two MNIST
MLPs on MNIST images saved by `datasets` (the evaluation on them is the bundled MNIST's, row for
row), and the mistakes a user makes with such a dataset, each one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import error_line, run_cli
from mergecli.data.mnist import mnist_arrays

datasets = pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")
datasets.disable_progress_bars()

TRANSFORM = "[{normalize: mnist}]"


def save_mnist(path: Path, splits: dict[str, tuple[int, int]]) -> None:
    """Rows of the bundled MNIST as a DatasetDict of grayscale PNGs (the Image feature) and
    ClassLabel labels, as `datasets` saves MNIST."""
    images, labels = mnist_arrays()
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    parts = {
        name: datasets.Dataset.from_dict(
            {
                "image": [Image.fromarray(a) for a in images[start:stop]],
                "label": labels[start:stop].astype(int).tolist(),
            },
            features=features,
        )
        for name, (start, stop) in splits.items()
    }
    datasets.DatasetDict(parts).save_to_disk(str(path))


def recipe(tmp_path: Path, pair: tuple[Path, Path], data: str, steps: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"""\
version: 1
name: hf-dataset
model: {{arch: mlp, args: {{depth: 3, hidden: 32}}}}
checkpoints:
  - path: {pair[0]}
  - path: {pair[1]}
data:
{data}
steps:
{steps}
output: {{dir: {tmp_path / "out"}}}
"""
    )
    return path


@pytest.mark.slow
def test_align_fit_evaluate_on_a_saved_dataset_match_the_bundled_mnist(
    tmp_path: Path, trained_pair
) -> None:
    saved = tmp_path / "mnist"
    save_mnist(saved, {"train": (0, 600), "test": (8000, 8400)})
    hf = f"{{source: hf_dataset, path: {saved}, mode: L, transform: {TRANSFORM}"
    data = f"""\
  fit: {hf}, batch_size: 100}}
  eval:
    bundled: {{source: mnist, split: "8000:8400"}}
    saved: {hf}, split: test}}"""
    steps = """\
  - align: {method: weight_matching}
  - fit: {method: np_merge, epochs: 1}
  - evaluate: {baselines: [endpoints]}"""
    path = recipe(tmp_path, trained_pair, data, steps)
    result = run_cli("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert f"data.fit: hf_dataset {saved}, inputs [1, 28, 28] fit the model" in result.stdout
    result = run_cli("run", str(path))
    assert result.returncode == 0, result.stderr
    assert "merged (weight_matching + np_merge)" in result.stdout, result.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())["evaluate"]
    assert report["sets"] == {"bundled": 400, "saved": 400}
    rows = {s: [r for r in report["results"] if r["set"] == s] for s in ("bundled", "saved")}
    assert len(rows["saved"]) == 3  # the merged model and both endpoints
    for bundled, saved_row in zip(rows["bundled"], rows["saved"], strict=True):
        assert saved_row["name"] == bundled["name"]
        # the same 400 images, written as PNGs and decoded: the same predictions
        assert saved_row["accuracy"] == bundled["accuracy"]
        assert saved_row["per_class_accuracy"] == bundled["per_class_accuracy"]
        assert saved_row["loss"] == pytest.approx(bundled["loss"], rel=1e-6)
    assert min(r["accuracy"] for r in rows["saved"]) > 0.7


@pytest.mark.parametrize(
    "case", ["missing path", "missing column", "float labels", "unknown split", "corrupt image"]
)
def test_dataset_mistakes_are_one_line(tmp_path: Path, trained_pair, case: str) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(a) for a in rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)]
    labels: list = [0, 1, 2, 3, 4]
    saved = tmp_path / "ds"
    spec = f"{{source: hf_dataset, path: {saved}, mode: L, transform: {TRANSFORM}}}"
    code = 2  # found by the checks before any step, at the recipe's line
    if case == "missing path":
        spec = spec.replace(str(saved), str(tmp_path / "elsewhere"))
        needle = f"data.eval.path: no dataset at {tmp_path / 'elsewhere'}"
    elif case == "missing column":
        spec = spec.replace("mode: L", "mode: L, label: digit")
        needle = "data.eval.label: no column 'digit' in"
    elif case == "float labels":
        labels = [0.0, 1.5, 2.0, 3.0, 4.0]
        needle = "data.eval.label: column 'label' of"
    elif case == "unknown split":
        spec = spec.replace("mode: L", "mode: L, split: validation")
        needle = "data.eval.split: no split 'validation' in"
    else:
        needle, code = f"data.eval.image: cannot decode the image in row 3 of {saved}", 1
    features = datasets.Features({"image": datasets.Image(decode=False)})
    cells = datasets.Dataset.from_dict({"image": images}).cast(features)["image"]
    cells = [dict(cell) for cell in cells]
    if case == "corrupt image":
        cells[3]["bytes"] = cells[3]["bytes"][:50]
    table = datasets.Dataset.from_dict({"image": cells, "label": labels}).cast_column(
        "image", datasets.Image()
    )
    if case == "unknown split":
        datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(saved))
    else:
        table.save_to_disk(str(saved))
    path = recipe(
        tmp_path,
        trained_pair,
        f"  eval: {spec}",
        "  - merge: {method: average}\n  - evaluate: {baselines: [endpoints]}",
    )
    line = error_line(run_cli("run", str(path)), code)
    assert needle in line, line
    if case == "missing column":
        assert "(columns: image, label)" in line, line
    if case == "unknown split":
        assert "(splits: train, test)" in line, line
    if case == "float labels":
        assert "holds double, not integer class ids" in line, line
    if code == 2:
        assert line.startswith(f"{path}:"), line


@pytest.mark.slow
def test_a_text_column_reaches_a_classifier_as_ids_with_their_mask(tmp_path: Path) -> None:
    """Rows of words of different lengths, one token each: fit and evaluate on the text column
    report what a tensors file of the same ids and mask (built here) reports."""
    pytest.importorskip("tokenizers")
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from fixtures.token_models import token_task, trained

    ids, labels = token_task(600, seed=0)
    for seed in (0, 1):
        save_file(trained(seed, ids[:400], labels[:400]), tmp_path / f"m{seed}.safetensors")
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(32)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "tok"
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "w0"}))
    lengths = torch.randint(6, 13, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = [ids[400 + i, :n].tolist() for i, n in enumerate(lengths)]
    texts = [" ".join(f"w{t}" for t in row) for row in rows]
    datasets.Dataset.from_dict({"sentence": texts, "label": labels[400:].tolist()}).save_to_disk(
        str(tmp_path / "texts")
    )
    padded = torch.zeros(200, 12, dtype=torch.int64)  # w0, id 0, pads; the mask hides it
    mask = torch.zeros(200, 12, dtype=torch.int64)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    save_file({"x": padded, "y": labels[400:], "mask": mask}, tmp_path / "ids.safetensors")
    hf = f"{{source: hf_dataset, path: {tmp_path / 'texts'}, text: sentence, seq_len: 12"
    tensors = f"{{source: tensors, path: {tmp_path / 'ids.safetensors'}, mask: mask}}"
    recipe = tmp_path / "text.yaml"
    recipe.write_text(
        "version: 1\n"
        "model: {arch: 'fixtures.token_models:build'}\n"
        f"checkpoints: [{{path: {tmp_path / 'm0.safetensors'}}}, "
        f"{{path: {tmp_path / 'm1.safetensors'}}}]\n"
        "data:\n"
        f"  fit: {hf}, tokenizer: {folder}, batch_size: 50}}\n"
        f"  eval:\n    text: {hf}, tokenizer: {folder}}}\n    ids: {tensors}\n"
        "steps:\n"
        "  - fit: {method: np_merge, epochs: 1, lr: 0.05}\n"
        "  - evaluate: {method: classification, baselines: [endpoints]}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    result = run_cli("--log", "plain", "run", str(recipe))
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "out" / "report.json").read_text())["evaluate"]["results"]
    by_set = {s: [r for r in results if r["set"] == s] for s in ("text", "ids")}
    assert len(by_set["text"]) == 3
    for text_row, ids_row in zip(by_set["text"], by_set["ids"], strict=True):
        assert text_row["name"] == ids_row["name"]
        assert text_row["accuracy"] == ids_row["accuracy"]
        assert text_row["loss"] == pytest.approx(ids_row["loss"], rel=1e-6)
    assert min(r["accuracy"] for r in by_set["text"]) > 0.6
