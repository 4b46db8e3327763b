"""The ``imagefolder`` source: ``root/<class name>/**/<image>`` (as torchvision's ImageFolder),
classes sorted by name and numbered from 0, images decoded with Pillow (an optional extra)."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mergecli.data.transforms import AT_LOAD, Step, apply_at_load
from mergecli.errors import MergeCliError, describe
from mergecli.runtime.device import one_thread

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MODES = ("RGB", "L")
INSTALL_HINT = "pip install 'mergecli[images]'"
# Bumped when what is cached for the same inputs changes (the key includes it).
CACHE_VERSION = "1"
LAYOUT = "root/<class name>/<image>.png|jpg|jpeg|bmp|webp, one folder per class"


@dataclass(frozen=True)
class Folder:
    """The images found under ``root``: class names (sorted) and each file with its label."""

    root: Path
    classes: list[str]
    files: list[Path]
    labels: list[int]


def pillow(where: str, source: str = "imagefolder") -> Any:
    """Pillow's Image module, imported only when images are read (an optional extra)."""
    try:
        from PIL import Image
    except ImportError:
        raise MergeCliError(f"{where}: source '{source}' needs Pillow: {INSTALL_HINT}") from None
    return Image


def scan(spec: Mapping[str, Any], where: str) -> Folder:
    """The class folders and image files under ``root:``, sorted (so labels and order do not
    depend on the file system); an empty class folder is refused."""
    raw_root = spec.get("root")
    if not isinstance(raw_root, str) or not raw_root:
        raise MergeCliError(f"{where}.root: source 'imagefolder' needs `root:` ({LAYOUT})")
    root = Path(raw_root).expanduser()
    if not root.is_dir():
        raise MergeCliError(
            f"{where}.root: no image folder at {root} (working directory {os.getcwd()}): "
            f"expected {LAYOUT}; nothing is downloaded"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in SUFFIXES][:1]
        found = f" (it holds images such as {loose[0]} directly)" if loose else ""
        raise MergeCliError(f"{where}.root: {root} has no class folders{found}; expected {LAYOUT}")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = root / name
        images = sorted(
            (p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()),
            key=lambda p: p.relative_to(folder).as_posix(),
        )
        if not images:
            raise MergeCliError(
                f"{where}.root: class folder {folder} holds no images "
                f"({', '.join(SUFFIXES)}); add images or remove the folder"
            )
        files.extend(images)
        labels.extend([label] * len(images))
    return Folder(root, classes, files, labels)


def class_labels(classes: Any, folder: Folder, where: str) -> list[int] | None:
    """``classes:`` as labels: a name is a class folder, a number indexes the sorted folders."""
    if classes is None:
        return None
    if not isinstance(classes, (list, tuple)):
        raise MergeCliError(f"{where}.classes: expected a list of class names, got {classes!r}")
    labels = []
    for value in classes:
        if isinstance(value, str):
            if value not in folder.classes:
                shown = ", ".join(folder.classes[:10]) + (
                    ", ..." if len(folder.classes) > 10 else ""
                )
                raise MergeCliError(
                    f"{where}.classes: no class {value!r} in {folder.root} (classes: {shown})"
                )
            labels.append(folder.classes.index(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(folder.classes):
                raise MergeCliError(
                    f"{where}.classes: class {value} is out of range: {folder.root} has "
                    f"{len(folder.classes)} classes, numbered 0..{len(folder.classes) - 1} in "
                    "name order"
                )
            labels.append(value)
        else:
            raise MergeCliError(
                f"{where}.classes: {value!r} is neither a class name nor a class number"
            )
    return labels


def image_mode(spec: Mapping[str, Any], where: str) -> str:
    mode = spec.get("mode") or "RGB"
    if mode not in MODES:
        raise MergeCliError(f"{where}.mode: expected RGB or L, got {mode!r}")
    return mode


def first_size(folder: Folder, where: str) -> tuple[int, int]:
    """The (height, width) of the first image, from its header alone."""
    image_module = pillow(where)
    try:
        with image_module.open(folder.files[0]) as image:
            width, height = image.size
    except Exception as exc:  # Pillow raises many types on a damaged file
        raise _corrupt(folder.files[0], exc, where) from exc
    return height, width


def decode(
    files: Sequence[Path], mode: str, steps: Sequence[Step], workers: int, where: str
) -> Tensor:
    """The images (N, C, H, W) uint8, each through the load-time steps; with ``workers`` > 0 a
    pool of that many processes decodes them. Images left of different sizes are refused."""
    pillow(where)
    encoded = [(str(path), f"image {path}") for path in files]
    return decode_images(
        encoded, [str(path) for path in files], "root", mode, steps, workers, where
    )


def decode_images(
    encoded: Sequence[tuple[str | bytes, str]],
    names: Sequence[str],
    key: str,
    mode: str,
    steps: Sequence[Step],
    workers: int,
    where: str,
) -> Tensor:
    """Images given as (a file path or the file's bytes, what to call it in a message), as in
    `decode`; a damaged one is refused at ``where.key``, one of different size by its name."""
    jobs = [(source, what, key, mode, tuple(steps), where) for source, what in encoded]
    if workers > 0 and len(jobs) > 1:
        # fork: the workers start at once, without importing mergecli again.
        method = "fork" if sys.platform.startswith("linux") else None
        context = multiprocessing.get_context(method)
        with context.Pool(workers, initializer=_worker_on_one_thread) as pool:
            chunk = max(1, min(64, len(jobs) // (4 * workers)))
            results = pool.imap(_decode_one, jobs, chunksize=chunk)
            return _stack(results, names, where)
    # One image is too small a job for torch's intra-op threads (on a busy machine they make
    # it several times slower): one thread, as in each worker.
    with one_thread():
        return _stack(map(_decode_one, jobs), names, where)


def _stack(results: Any, names: Sequence[str], where: str) -> Tensor:
    out = None
    for i, (error, array) in enumerate(results):
        if error is not None:
            raise MergeCliError(error)
        if out is None:
            out = torch.empty((len(names), *array.shape), dtype=torch.uint8)
        elif tuple(array.shape) != tuple(out.shape[1:]):
            raise MergeCliError(
                f"{where}: images of different sizes: {names[0]} is {_size(out.shape[1:])}, "
                f"{names[i]} is {_size(array.shape)}; add a resize (and center_crop) step to "
                "`transform:`"
            )
        out[i] = torch.from_numpy(array)
    assert out is not None  # files is never empty
    return out


def _size(shape: Sequence[int]) -> str:
    return f"{shape[2]}x{shape[1]} (width x height) with {shape[0]} channel(s)"


def _worker_on_one_thread() -> None:
    """One torch thread per worker process: the pool is the parallelism."""
    torch.set_num_threads(1)


def _decode_one(
    job: tuple[str | bytes, str, str, str, tuple[Step, ...], str],
) -> tuple[str | None, Any]:
    """One image (a file's path or its bytes) as (C, H, W) uint8 after the load-time steps; an
    error comes back as its message (a worker returns it rather than raising across the
    process boundary)."""
    source, what, key, mode, steps, where = job
    from PIL import Image

    try:
        with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
            image.load()  # decode it all now: a truncated file fails here, named
            pixels = np.asarray(image.convert(mode))
    except Exception as exc:  # Pillow raises many types on a damaged file
        return f"{where}.{key}: cannot decode {what} ({describe(exc)}); replace or remove it", None
    x = torch.from_numpy(pixels.copy())
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1).contiguous()
    try:
        x = apply_at_load(x[None], steps, what, f"{where}.transform")[0]
    except MergeCliError as exc:
        return str(exc), None
    return None, x.numpy()


def _corrupt(path: Path, exc: Exception, where: str) -> MergeCliError:
    return MergeCliError(
        f"{where}.root: cannot decode image {path} ({describe(exc)}); replace or remove it"
    )


def cache_dir(value: Any, where: str) -> Path | None:
    """Where decoded images are kept: none by default (they can take gigabytes); ``cache:
    true``: $MERGECLI_CACHE/images, else ~/.cache/mergecli/images; or the directory given."""
    if value is None or value is False:
        return None
    if value is True:
        root = os.environ.get("MERGECLI_CACHE")
        return (
            Path(root).expanduser() / "images" if root else Path.home() / ".cache/mergecli/images"
        )
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise MergeCliError(f"{where}.cache: expected a directory, true or false, got {value!r}")
    return Path(value).expanduser()


def cache_key(root: Path, files: Sequence[Path], mode: str, steps: Sequence[Step]) -> str:
    """sha256 over what the decoded images depend on: each chosen file's path under the root,
    size and modification time (a stat, not a read: an image folder can hold gigabytes), the
    mode and the load-time steps."""
    digest = hashlib.sha256(f"mergecli-images:{CACHE_VERSION}:{mode}".encode())
    for path in files:
        stat = path.stat()
        record = f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
        digest.update(record.encode())
    digest.update(json.dumps([[s.name, s.size] for s in steps if s.name in AT_LOAD]).encode())
    return digest.hexdigest()


def read_cached(cache: Path, key: str, count: int) -> Tensor | None:
    """The images cached under ``key`` (None: a miss, or an unreadable or foreign entry)."""
    path = cache / f"{key}.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        images = load_file(str(path))["images"]
    except Exception:  # noqa: BLE001 - a damaged entry is a miss; it is written again
        return None
    if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != count:
        return None
    return images


def write_cached(cache: Path, key: str, images: Tensor, where: str) -> None:
    """Save the decoded images in the cache."""
    from mergecli.io.atomic import write_cache_entry

    try:
        write_cache_entry(cache / f"{key}.safetensors", {"images": images},
                          {"mergecli.image_cache": key})  # fmt: skip
    except OSError as exc:
        raise MergeCliError(
            f"{where}.cache: cannot write decoded images in {cache} ({describe(exc)}); set "
            "`cache:` to a writable directory, or false"
        ) from exc
