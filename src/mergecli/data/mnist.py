"""The bundled MNIST test set (10,000 images): idx parsing and the ``mnist`` source."""

from __future__ import annotations

import functools
import gzip
import struct
from collections.abc import Mapping
from importlib import resources
from typing import Any

import numpy as np
import torch

from mergecli.data.batches import TensorData
from mergecli.data.subset import SPLIT_HELP, parse_slice
from mergecli.errors import MergeCliError

IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
LABELS_FILE = "t10k-labels-idx1-ubyte.gz"
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NUM_EXAMPLES = 10_000
TRAIN_SIZE = 8_000  # "train" is the first 8,000 of the test set, "test" the last 2,000

NAMED_SPLITS = {
    "train": (0, TRAIN_SIZE),
    "test": (TRAIN_SIZE, NUM_EXAMPLES),
    "all": (0, NUM_EXAMPLES),
}

_REINSTALL = "reinstall mergecli to restore the bundled MNIST files"


def parse_idx_images(raw: bytes, name: str = IMAGES_FILE) -> np.ndarray:
    """Parse an uncompressed idx3 image file into a uint8 array (N, rows, cols)."""
    if len(raw) < 16:
        raise MergeCliError(f"mnist: {name} is truncated ({len(raw)} bytes); {_REINSTALL}")
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != IMAGES_MAGIC:
        raise MergeCliError(
            f"mnist: {name} has magic number {magic}, expected {IMAGES_MAGIC}; {_REINSTALL}"
        )
    expected = 16 + n * rows * cols
    if len(raw) != expected:
        raise MergeCliError(
            f"mnist: {name} has {len(raw)} bytes but its header ({n}x{rows}x{cols}) "
            f"implies {expected}; {_REINSTALL}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def parse_idx_labels(raw: bytes, name: str = LABELS_FILE) -> np.ndarray:
    """Parse an uncompressed idx1 label file into a uint8 array (N,)."""
    if len(raw) < 8:
        raise MergeCliError(f"mnist: {name} is truncated ({len(raw)} bytes); {_REINSTALL}")
    magic, n = struct.unpack(">II", raw[:8])
    if magic != LABELS_MAGIC:
        raise MergeCliError(
            f"mnist: {name} has magic number {magic}, expected {LABELS_MAGIC}; {_REINSTALL}"
        )
    if len(raw) != 8 + n:
        raise MergeCliError(
            f"mnist: {name} has {len(raw)} bytes but its header ({n} labels) implies {8 + n}; "
            f"{_REINSTALL}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=8)


def _read_bundled(name: str) -> bytes:
    """Decompressed bytes of one bundled file."""
    try:
        packed = resources.files("mergecli.data").joinpath("bundled", name).read_bytes()
        return gzip.decompress(packed)
    except (OSError, EOFError) as exc:
        raise MergeCliError(
            f"mnist: cannot read bundled {name} ({type(exc).__name__}: {exc}); {_REINSTALL}"
        ) from exc


@functools.lru_cache(maxsize=1)
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Raw uint8 MNIST test images (10000, 28, 28) and labels (10000,), parsed once."""
    images = parse_idx_images(_read_bundled(IMAGES_FILE))
    labels = parse_idx_labels(_read_bundled(LABELS_FILE))
    if images.shape != (NUM_EXAMPLES, 28, 28) or labels.shape != (NUM_EXAMPLES,):
        raise MergeCliError(
            f"mnist: bundled files hold images {images.shape} and labels {labels.shape}, "
            f"expected ({NUM_EXAMPLES}, 28, 28) and ({NUM_EXAMPLES},); {_REINSTALL}"
        )
    if int(labels.max()) > 9:
        raise MergeCliError(f"mnist: {LABELS_FILE} has labels above 9; {_REINSTALL}")
    # Cached and shared between callers, so nobody may modify them in place.
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_mnist(spec: Mapping[str, Any], where: str) -> TensorData:
    """The ``mnist`` source: a split of the bundled set, normalised, as (N, 1, 28, 28) float32."""
    split = spec.get("split", "train")
    if split is None:
        split = "train"
    if isinstance(split, str) and split.strip() in NAMED_SPLITS:
        start, stop = NAMED_SPLITS[split.strip()]
    elif isinstance(split, str) and ":" in split:
        start, stop = parse_slice(split, NUM_EXAMPLES, where)
    else:
        raise MergeCliError(
            f"{where}.split: unknown mnist split {split!r}; use 'train' (first 8000), "
            f"'test' (last 2000), 'all', or {SPLIT_HELP}"
        )
    images, labels = mnist_arrays()
    x = torch.from_numpy(images[start:stop].astype(np.float32))
    x = x.div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
    y = torch.from_numpy(labels[start:stop].astype(np.int64))
    return TensorData(x, y, torch.arange(start, stop))
