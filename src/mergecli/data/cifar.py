"""CIFAR-10 and CIFAR-100 read from their distributed directory layouts (Krizhevsky 2009,
https://www.cs.toronto.edu/~kriz/cifar.html), never downloaded.

The binary version is parsed with numpy: records of 1 label byte (CIFAR-100: a coarse and a
fine label byte) and 3072 pixel bytes, the red, green and blue 32x32 planes. The python
version's files are pickles, which can run any code while they load: they are read by an
unpickler that admits only what those files hold (a dict of bytes, lists of ints and numpy
uint8 arrays) and refuses every other global, so nothing read from a file decides what runs."""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergecli.errors import MergeCliError, describe

PIXELS = 3 * 32 * 32
SHAPE = (3, 32, 32)
SITE = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class Layout:
    """One distributed layout of a dataset: its directory name and the files of each split."""

    version: str  # "binary" or "python"
    directory: str
    files: Mapping[str, tuple[str, ...]]


LAYOUTS: dict[str, tuple[Layout, Layout]] = {
    "cifar10": (
        Layout(
            "binary",
            "cifar-10-batches-bin",
            {
                "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                "test": ("test_batch.bin",),
            },
        ),
        Layout(
            "python",
            "cifar-10-batches-py",
            {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        ),
    ),
    "cifar100": (
        Layout("binary", "cifar-100-binary", {"train": ("train.bin",), "test": ("test.bin",)}),
        Layout("python", "cifar-100-python", {"train": ("train",), "test": ("test",)}),
    ),
}
CLASSES = {"cifar10": 10, "cifar100": 100}
COARSE_CLASSES = 20


def cifar_files(source: str, spec: Mapping[str, Any], where: str) -> tuple[Layout, list[Path]]:
    """The layout found under ``root:`` (the directory holding the layout directory, or that
    directory itself; the binary version first) and the files of the split."""
    split = spec.get("split") or "train"
    if split not in ("train", "test"):
        raise MergeCliError(f"{where}.split: {source} has splits train and test, got {split!r}")
    raw_root = spec.get("root")
    if not isinstance(raw_root, str) or not raw_root:
        raise MergeCliError(
            f"{where}.root: source '{source}' needs `root:`, the directory holding "
            f"{' or '.join(layout.directory for layout in LAYOUTS[source])}"
        )
    root = Path(raw_root).expanduser()
    for layout in LAYOUTS[source]:
        for directory in (root / layout.directory, root):
            if directory == root and root.name != layout.directory:
                # The layout dir itself, under another name: recognised by its files.
                if not any((root / name).is_file() for name in layout.files[split]):
                    continue
            elif not directory.is_dir():
                continue
            files = [directory / name for name in layout.files[split]]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise MergeCliError(
                    f"{where}.root: {directory} is not a complete {source} "
                    f"{layout.version}-version layout: {', '.join(missing)} missing (the "
                    f"{split} split is {', '.join(layout.files[split])}); extract the archive "
                    f"from {SITE} again"
                )
            return layout, files
    binary, python = LAYOUTS[source]
    raise MergeCliError(
        f"{where}.root: no {source} under {root}: expected {root}/{binary.directory}/ "
        f"({_listed(binary.files[split])}: the binary version) or {root}/{python.directory}/ "
        f"({_listed(python.files[split])}: the python version), as extracted from {SITE}; "
        "nothing is downloaded"
    )


def _listed(files: tuple[str, ...]) -> str:
    return f"{files[0]} .. {files[-1]}" if len(files) > 2 else ", ".join(files)


def load_cifar(
    source: str, spec: Mapping[str, Any], where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images (N, 3, 32, 32) uint8 and labels (N,) int64 (CIFAR-100: the fine
    labels, or the coarse ones with ``labels: coarse``)."""
    labels = spec.get("labels") or "fine"
    if labels not in ("fine", "coarse") or (source == "cifar10" and labels != "fine"):
        raise MergeCliError(
            f"{where}.labels: expected fine or coarse (CIFAR-100 only), got {labels!r}"
        )
    layout, files = cifar_files(source, spec, where)
    images, fine, coarse = [], [], []
    for path in files:
        read = _read_binary if layout.version == "binary" else _read_python
        x, y_fine, y_coarse = read(str(path), source, where)
        images.append(x)
        fine.append(y_fine)
        coarse.append(y_coarse)
    y = np.concatenate(coarse if labels == "coarse" else fine)
    x = torch.from_numpy(np.concatenate(images).reshape(-1, *SHAPE))
    return x, torch.from_numpy(y.astype(np.int64))


def _read_binary(
    path: str, source: str, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Records of [coarse label,] label, 3072 pixels."""
    size = Path(path).stat().st_size
    label_bytes = 2 if source == "cifar100" else 1
    record = label_bytes + PIXELS
    if size == 0 or size % record:
        raise MergeCliError(
            f"{where}.root: {path} has {size} bytes, not a whole number of {record}-byte "
            f"records ({label_bytes} label byte(s) + {PIXELS} pixels); it is not the {source} "
            f"binary version: extract it again from {SITE}"
        )
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, record)
    fine = raw[:, label_bytes - 1].copy()
    coarse = raw[:, 0].copy() if source == "cifar100" else None
    _check_labels(fine, CLASSES[source], path, where)
    if coarse is not None:
        _check_labels(coarse, COARSE_CLASSES, path, where)
    return raw[:, label_bytes:], fine, coarse


def _read_python(
    path: str, source: str, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A python-version batch: a dict with b"data" (N, 3072) uint8 and b"labels" (CIFAR-10) or
    b"fine_labels" and b"coarse_labels" (CIFAR-100), lists of ints."""
    with open(path, "rb") as handle:
        content = handle.read()
    try:
        batch = CifarUnpickler(io.BytesIO(content), encoding="bytes").load()
    except MergeCliError as exc:
        raise MergeCliError(f"{where}.root: {path}: {exc}") from None
    except Exception as exc:  # a truncated or foreign file: pickle raises many types
        raise MergeCliError(
            f"{where}.root: cannot read {path} as a {source} python-version batch "
            f"({describe(exc)}); extract it again from {SITE}"
        ) from exc
    keys = (b"labels",) if source == "cifar10" else (b"fine_labels", b"coarse_labels")
    fix = f"it is not the {source} python version: extract it again from {SITE}"
    if not isinstance(batch, dict) or not all(k in batch for k in (b"data", *keys)):
        held = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise MergeCliError(
            f"{where}.root: {path} holds {held}, not a dict with b'data' and "
            f"{', '.join(map(repr, keys))}; {fix}"
        )
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (PIXELS,):
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise MergeCliError(
            f"{where}.root: {path}: b'data' is {what}, expected (N, {PIXELS}) uint8; {fix}"
        )
    labels = []
    for key, classes in zip(keys, (CLASSES[source], COARSE_CLASSES), strict=False):
        values = batch[key]
        if not isinstance(values, (list, np.ndarray)) or len(values) != len(data):
            raise MergeCliError(
                f"{where}.root: {path}: {key!r} is not a list of {len(data)} labels; {fix}"
            )
        array = np.asarray(values)
        if array.dtype.kind not in "iu":
            raise MergeCliError(f"{where}.root: {path}: {key!r} holds non-integers; {fix}")
        _check_labels(array, classes, path, where)
        labels.append(array.astype(np.int64))
    coarse = labels[1] if len(labels) > 1 else None
    return data, labels[0], coarse


def _check_labels(labels: np.ndarray, classes: int, path: str, where: str) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise MergeCliError(
            f"{where}.root: {path} has label {int(labels.max())}, outside 0..{classes - 1}; it "
            f"is not this dataset, or is damaged: extract it again from {SITE}"
        )


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals a numpy array's pickle names, under numpy 1's and numpy 2's module names."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray}
    allowed[("numpy", "dtype")] = np.dtype
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        if hasattr(numeric, "_frombuffer"):  # protocol 5 pickles of arrays
            allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class CifarUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR's python-version batches: numpy's array and dtype reconstruction
    and ``_codecs.encode`` (how Python 3 writes bytes at protocol 2) are the only globals it
    finds; any other (os.system, builtins.eval, ...) is refused before it could be called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        allowed = _numpy_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise MergeCliError(
            f"refused to load: the pickle asks for {module}.{name}, which a CIFAR batch never "
            "holds (only numpy arrays, lists and bytes are read); this file is not a CIFAR "
            f"python-version batch: get the dataset from {SITE}"
        )
