"""Image loading throughput against what a fit step consumes, same machine, same run.

Loader: a generated CIFAR-10 binary-version layout (--images training images) read by the
`cifar10` source with the papers' augmentation (`transform: [{random_crop: 32, padding: 4},
{hflip: 0.5}, {normalize: cifar10}]`, `augment: true`); its images/s are one shuffled epoch of
batches of --batch (uint8 gather, to float, crop, flip, normalise, per batch) on the device.
Fit: one NP Merge fit step of two ResNet-20s (width --width) on a batch of the same size,
median of --repeats, as bench/fit_step.py builds it; its images/s are batch / step time.
Prints both and their ratio loader / fit (goal >= 1.5: data never starves the fit).

Also: the load itself (parse the files into uint8, once per run), and loading an ImageFolder
of --files JPEGs of --size x --size pixels (ImageNet-like photos are ~400x350), resized and
centre-cropped to 64x64 at load, with `workers: 0` against `workers: 2`.
Run: PYTHONPATH=src .venv/bin/python bench/image_loader.py [--images 10000] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mergecli.data import load_data
from mergecli.fit.coefficients import FlatParameters, pairwise_merge
from mergecli.fit.loop import CoefficientStep, FitConfig
from mergecli.models import build_model

AUGMENTED = [{"random_crop": 32, "padding": 4}, {"hflip": 0.5}, {"normalize": "cifar10"}]


def write_cifar10_binary(root: Path, images: int, seed: int = 0) -> Path:
    """A CIFAR-10 binary-version layout of random images: 5 training files and a test file."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    per_file = images // 5
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        records = rng.integers(0, 256, size=(per_file, 3073), dtype=np.uint8)
        records[:, 0] %= 10
        (folder / name).write_bytes(records.tobytes())
    return root


def loader_images_per_second(spec: dict, batch: int, device: torch.device) -> tuple[float, float]:
    """Seconds to load the dataset, and images/s of one augmented shuffled epoch of batches."""
    started = time.perf_counter()
    data = load_data(spec).pin_memory()
    load_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    next(iter(data.batches(batch, shuffle=True, generator=generator, device=device)))  # warm up
    _sync(device)
    started = time.perf_counter()
    seen = 0
    for x, _ in data.batches(batch, shuffle=True, generator=generator, device=device):
        seen += len(x)
    _sync(device)
    return load_s, seen / (time.perf_counter() - started)


def fit_images_per_second(width: float, batch: int, device: torch.device, repeats: int) -> float:
    """Images/s of an NP Merge fit step of two ResNet-20s (median step time)."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    args = {"width": width}
    module = build_model("resnet20", args).to(device).train()
    models = [build_model("resnet20", args).state_dict() for _ in range(2)]
    names = [n for n, _ in module.named_parameters()]
    flat = FlatParameters.stack(models, names, device)
    buffers = {n: t.to(device) for n, t in models[0].items() if n not in names}
    config = FitConfig("parameter", "adam", 0.05, 1, None, batch, 0.0, 0, 10**9)
    fit = CoefficientStep(
        module, flat, buffers, pairwise_merge, torch.zeros(flat.thetas.shape[1]),
        lambda out, index: F.cross_entropy(out, y), config, device,
    )  # fmt: skip
    for _ in range(2):
        fit.update(fit.loss(x, y))
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fit.update(fit.loss(x, y))
        _sync(device)
        times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


def decode_images_per_second(root: Path, count: int, workers: int) -> float:
    """Images/s of loading an ImageFolder of ``count`` images with ``workers``."""
    started = time.perf_counter()
    transform = [{"resize": 64}, {"center_crop": 64}]
    spec = {"source": "imagefolder", "root": str(root), "workers": workers, "transform": transform}
    data = load_data(spec)
    assert len(data) == count
    return count / (time.perf_counter() - started)


def write_jpegs(root: Path, count: int, size: int) -> Path:
    """Smooth random images (noise upscaled, as photos compress) saved as JPEG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
        image.save(folder / f"img_{i:05d}.jpg", quality=90)
    return root


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_cifar10_binary(Path(tmp) / "cifar", args.images)
        spec = {"source": "cifar10", "root": str(root), "transform": AUGMENTED, "augment": True}
        load_s, loader = loader_images_per_second(spec, args.batch, device)
        fit = fit_images_per_second(args.width, args.batch, device, args.repeats)
        folder = write_jpegs(Path(tmp) / "jpegs", args.files, args.size)
        serial = decode_images_per_second(folder, args.files, 0)
        pooled = decode_images_per_second(folder, args.files, 2)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"load {args.images} CIFAR-10 images (binary version, uint8): {load_s:.3f} s")
    print("| stage | images/s | × fit |")
    print("| --- | --- | --- |")
    print(f"| loader: augmented shuffled batches of {args.batch} | {loader:,.0f} | "
          f"{loader / fit:.1f} |")  # fmt: skip
    print(f"| fit: NP Merge step, two ResNet-20x{args.width:g} | {fit:,.0f} | 1.0 |")
    print(f"ratio loader / fit: {loader / fit:.1f} (goal >= 1.5)")
    print(f"imagefolder load of {args.files} {args.size}x{args.size} JPEGs to 64x64: workers 0 "
          f"{serial:,.0f} images/s, workers 2 {pooled:,.0f} images/s "
          f"({pooled / serial:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
