"""Image datasets on disk, run as a user runs them: `mergecli train` on a CIFAR-10-layout
directory (with augmentation), then a recipe that aligns, fits and evaluates on it; and the
data mistakes a user makes with them, each one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.images import write_cifar, write_imagefolder
from helpers import run_cli

VGG = ["--arch", "vgg", "--arg", "variant=11", "--arg", "width=0.125"]
TRAIN_TRANSFORM = "[{random_crop: 32, padding: 4}, {hflip: 0.5}, {normalize: cifar10}]"


@pytest.mark.slow
def test_train_align_fit_evaluate_on_a_cifar10_layout(tmp_path: Path) -> None:
    write_cifar(tmp_path / "data", "cifar10", "binary", per_file=32)
    root = tmp_path / "data"
    train = f"{{source: cifar10, root: {root}, transform: {TRAIN_TRANSFORM}, augment: true}}"
    test = f"{{source: cifar10, root: {root}, split: test, transform: [{{normalize: cifar10}}]}}"
    for seed in (0, 1):
        run_cli(
            "--log", "plain", "train", *VGG, "--data", train, "--eval-data", test,
            "--epochs", "1", "--optimizer", "adam", "--lr", "0.003", "--seed", str(seed),
            "--out", str(tmp_path / f"m{seed}.safetensors"), check=True,
        )  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""\
version: 1
name: cifar-layout
model: {{arch: vgg, args: {{variant: 11, width: 0.125}}}}
checkpoints:
  - path: {tmp_path / "m0.safetensors"}
  - path: {tmp_path / "m1.safetensors"}
data:
  fit: {{source: cifar10, root: {root}, fraction: 0.5, batch_size: 40,
         transform: {TRAIN_TRANSFORM}, augment: true}}
  eval: {test}
steps:
  - align: {{method: weight_matching}}
  - fit: {{method: np_merge, epochs: 1}}
  - evaluate: {{baselines: [endpoints]}}
output: {{dir: {tmp_path / "out"}}}
"""
    )
    result = run_cli("run", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "merged (weight_matching + np_merge)" in result.stdout, result.stdout
    assert "evaluation on data.eval (32 examples)" in result.stdout, result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


def data_recipe(tmp_path: Path, pair: tuple[Path, Path], data: str) -> Path:
    """An MLP recipe whose data.eval is ``data`` (the checks about the data come first)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"""\
version: 1
name: image-errors
model: {{arch: mlp, args: {{depth: 3, hidden: 32}}}}
checkpoints:
  - path: {pair[0]}
  - path: {pair[1]}
data:
  eval: {data}
steps:
  - merge: {{method: average}}
  - evaluate: {{baselines: [endpoints]}}
output: {{dir: {tmp_path / "out"}}}
"""
    )
    return path


def one_line(*args: str, code: int) -> str:
    result = run_cli(*args)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line[:4].isdigit()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_missing_dataset_says_where_and_in_which_layout(tmp_path: Path, trained_pair) -> None:
    path = data_recipe(tmp_path, trained_pair, f"{{source: cifar10, root: {tmp_path / 'no'}}}")
    line = one_line("validate", str(path), code=2)
    assert line.startswith(f"{path}:8: data.eval.root: no cifar10 under {tmp_path / 'no'}"), line
    for needle in ("cifar-10-batches-bin/", "cifar-10-batches-py/", "nothing is downloaded"):
        assert needle in line, line
    line = one_line("train", "--data", f"{{source: cifar100, root: {tmp_path}}}", "--out",
                    str(tmp_path / "m.safetensors"), code=1)  # fmt: skip
    assert "--data.root: no cifar100 under" in line and "cifar-100-binary/" in line, line


def test_a_wrong_layout_is_one_line(tmp_path: Path, trained_pair) -> None:
    write_cifar(tmp_path, "cifar10", "python", per_file=4)
    batches = tmp_path / "cifar-10-batches-py"
    (batches / "data_batch_1").write_bytes(b"not a pickle at all")
    out = str(tmp_path / "m.safetensors")
    spec = f"{{source: cifar10, root: {tmp_path}}}"
    line = one_line("train", *VGG, "--data", spec, "--out", out, code=1)
    assert f"--data.root: cannot read {batches / 'data_batch_1'} as a cifar10" in line, line
    (batches / "data_batch_2").unlink()
    path = data_recipe(tmp_path, trained_pair, spec)
    line = one_line("validate", str(path), code=2)
    assert "not a complete cifar10 python-version layout: data_batch_2 missing" in line, line


@pytest.mark.parametrize("case", ["corrupt image", "empty class folder", "unknown class"])
def test_image_folder_mistakes_are_one_line(tmp_path: Path, trained_pair, case: str) -> None:
    folder = tmp_path / "digits"
    write_imagefolder(folder, {"one": 2, "two": 2}, size=(28, 28), mode="L")
    data = f"{{source: imagefolder, root: {folder}, mode: L, transform: [{{normalize: mnist}}]}}"
    code = 2
    if case == "corrupt image":
        (folder / "two" / "img_1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        needle, code = f"cannot decode image {folder / 'two' / 'img_1.png'}", 1
    elif case == "empty class folder":
        (folder / "three").mkdir()
        needle = f"class folder {folder / 'three'} holds no images"
    else:
        data = data.replace("mode: L", "mode: L, classes: [one, seven]")
        needle = "no class 'seven' in"
    line = one_line("run", str(data_recipe(tmp_path, trained_pair, data)), code=code)
    assert "data.eval" in line and needle in line, line
