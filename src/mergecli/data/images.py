"""Image sources (cifar10, cifar100, imagefolder) as TensorData: the subset options chosen on
the labels first, so only the kept images are decoded; the load-time transform steps applied
once; pixels kept as uint8 and made inputs per batch (`BatchTransform`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mergecli.data import cifar, imagefolder
from mergecli.data.batches import TensorData
from mergecli.data.subset import apply_subset
from mergecli.data.transforms import (
    BatchTransform,
    apply_at_load,
    batch_steps,
    check_batch_steps,
    has_random_step,
    load_steps,
    output_size,
    parse_transform,
)
from mergecli.errors import MergeCliError

IMAGE_SOURCES = ("cifar10", "cifar100", "imagefolder")
# CIFAR images pass the load-time steps this many at a time (bounded float memory).
CHUNK = 2048


def load_images(spec: Mapping[str, Any], seed: int, where: str) -> TensorData:
    """The image source ``spec``: uint8 pixels (N, C, H, W) and labels, with the transform that
    makes them inputs, after ``classes``, ``balanced`` and ``fraction``."""
    source = spec["source"]
    steps = parse_transform(spec.get("transform"), f"{where}.transform")
    augment = augment_option(spec, steps, where)
    workers = workers_option(spec, where)
    if source == "imagefolder":
        folder = imagefolder.scan(spec, where)
        mode = imagefolder.image_mode(spec, where)
        labels = imagefolder.class_labels(spec.get("classes"), folder, where)
        y = torch.tensor(folder.labels, dtype=torch.int64)
        chosen = choose_rows(y, {**spec, "classes": labels}, seed, where)
        files = [folder.files[int(i)] for i in chosen.rows]
        cache = imagefolder.cache_dir(spec.get("cache"), where)
        key = imagefolder.cache_key(folder.root, files, mode, steps) if cache else ""
        x = imagefolder.read_cached(cache, key, len(files)) if cache else None
        if x is None:
            x = imagefolder.decode(files, mode, steps, workers, where)
            if cache is not None:
                imagefolder.write_cached(cache, key, x, where)
    else:
        if spec.get("classes") is not None and any(
            not isinstance(c, int) or isinstance(c, bool) for c in spec["classes"]
        ):
            raise MergeCliError(
                f"{where}.classes: {source} classes are numbers (0..{cifar.CLASSES[source] - 1}), "
                f"got {spec['classes']!r}"
            )
        images, y = cifar.load_cifar(source, spec, where)
        chosen = choose_rows(y, spec, seed, where)
        x = _at_load(images, chosen.rows, steps, source, where)
    check_batch_steps(batch_steps(steps), *x.shape[1:], f"{where}.transform")
    transform = BatchTransform(batch_steps(steps), augment)
    return TensorData(x, chosen.y, chosen.rows, transform=transform)


def choose_rows(y: Tensor, spec: Mapping[str, Any], seed: int, where: str) -> TensorData:
    """The subset options on the labels alone: the kept rows (``rows``) and their labels."""
    rows = torch.arange(len(y))
    return apply_subset(TensorData(torch.zeros(len(y), 0), y, rows), spec, seed, where)


def _at_load(images: Tensor, rows: Tensor, steps: Any, source: str, where: str) -> Tensor:
    """The kept CIFAR images through the load-time steps, a chunk at a time."""
    if not load_steps(steps):
        return images[rows].contiguous()
    pieces = [
        apply_at_load(images[rows[i : i + CHUNK]], steps, f"{source} images", f"{where}.transform")
        for i in range(0, len(rows), CHUNK)
    ]
    return torch.cat(pieces)


def augment_option(spec: Mapping[str, Any], steps: Any, where: str) -> bool:
    """``augment:``, checked: true needs a random step in the transform."""
    augment = spec.get("augment", False)
    if augment is None:
        return False
    if not isinstance(augment, bool):
        raise MergeCliError(f"{where}.augment: expected true or false, got {augment!r}")
    if augment and not has_random_step(steps):
        raise MergeCliError(
            f"{where}.augment: true, but `transform:` has no random step; add random_crop "
            "(with padding) or hflip, e.g. [{random_crop: 32, padding: 4}, {hflip: 0.5}]"
        )
    return augment


def workers_option(spec: Mapping[str, Any], where: str) -> int:
    """``workers:``, the decoding processes (0: none), checked."""
    workers = spec.get("workers", 0)
    if workers is None:
        return 0
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise MergeCliError(f"{where}.workers: expected a whole number >= 0, got {workers!r}")
    return workers


def image_example_shape(spec: Mapping[str, Any], where: str) -> list[int]:
    """The shape of one input of the image source ``spec``, from its files' listing (and for
    an image folder sized by no transform step, its first image's header)."""
    source = spec["source"]
    steps = parse_transform(spec.get("transform"), f"{where}.transform")
    augment_option(spec, steps, where)
    workers_option(spec, where)
    if source == "imagefolder":
        imagefolder.cache_dir(spec.get("cache"), where)
        folder = imagefolder.scan(spec, where)
        channels = 3 if imagefolder.image_mode(spec, where) == "RGB" else 1
        imagefolder.class_labels(spec.get("classes"), folder, where)
        sized = any(
            step.name == "center_crop" or (step.name == "resize" and not isinstance(step.size, int))
            for step in steps
        )
        height, width = (0, 0) if sized else imagefolder.first_size(folder, where)
        height, width = output_size(steps, height or 1, width or 1)
    else:
        cifar.cifar_files(source, spec, where)
        channels, height, width = 3, *output_size(steps, 32, 32)
    check_batch_steps(batch_steps(steps), channels, height, width, f"{where}.transform")
    return [channels, height, width]
