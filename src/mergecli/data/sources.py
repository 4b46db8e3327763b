"""Data sources (mnist, tensors files, python factories) and the ``load_data`` dispatcher."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mergecli.data.batches import TensorData
from mergecli.data.hf_dataset import hf_example_shape, load_hf_dataset, uses_text
from mergecli.data.images import IMAGE_SOURCES, image_example_shape, load_images
from mergecli.data.mnist import load_mnist
from mergecli.data.subset import SPLIT_HELP, apply_subset, parse_slice
from mergecli.data.text import load_text, text_options, tokenizers_module
from mergecli.errors import MergeCliError, describe
from mergecli.user_code import import_object


def _key(spec: Mapping[str, Any], name: str, default: str, where: str) -> str:
    """A string option of ``spec``, with a default."""
    value = spec.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise MergeCliError(f"{where}.{name}: expected a non-empty string, got {value!r}")
    return value


def _labels(y: Tensor, what: str, where: str) -> Tensor:
    """Check labels are 1-D non-negative whole numbers and return them as int64."""
    if y.dim() != 1:
        raise MergeCliError(
            f"{where}.y: {what} has shape {tuple(y.shape)}; labels must be 1-D class ids "
            "(convert one-hot labels with argmax)"
        )
    if y.dtype == torch.bool or y.is_complex():
        raise MergeCliError(
            f"{where}.y: {what} has dtype {y.dtype}; labels must be integer class ids"
        )
    if y.is_floating_point():
        finite = torch.isfinite(y).all()
        if not finite or not torch.equal(y, torch.round(y)):
            raise MergeCliError(
                f"{where}.y: {what} has non-integer values (dtype {y.dtype}); "
                "labels must be integer class ids"
            )
    y = y.to(torch.int64)
    negative = torch.nonzero(y < 0).flatten()
    if len(negative):
        row = int(negative[0])
        raise MergeCliError(
            f"{where}.y: {what} has a negative label, {int(y[row])} in row {row} "
            f"({len(negative)} row(s) in all); labels must be class ids 0, 1, 2, ..."
        )
    return y


def _inputs(x: Tensor, what: str, where: str) -> Tensor:
    """Check inputs have a batch dimension; return real values as float32 and token ids
    (int16/int32/int64) as int64. Bytes (uint8) and booleans are pixel-like values, as float32:
    no vocabulary fits in a byte, while images are commonly stored as bytes."""
    if x.dim() == 0:
        raise MergeCliError(f"{where}.x: {what} is a scalar; inputs need shape (N, ...)")
    if x.is_complex():
        raise MergeCliError(f"{where}.x: {what} has complex dtype {x.dtype}; use real numbers")
    if x.dtype in (torch.int16, torch.int32, torch.int64):
        # Token ids index an embedding, which needs integers: a float cast breaks every model
        # that starts with one (and loses ids above 2**24).
        return x.to(torch.int64)
    return x.to(torch.float32)


def _check_finite(x: Tensor, what: str, where: str, first_row: int = 0) -> None:
    """Refuse NaN or infinite inputs: they poison every statistic, loss and metric downstream
    (an evaluation would report loss nan and exit 0). ``first_row`` is the source row of x[0]."""
    flat = x.reshape(len(x), -1)
    bad = torch.nonzero(~torch.isfinite(flat).all(dim=1)).flatten()
    if len(bad) == 0:
        return
    row = int(bad[0])
    kind = "NaN" if bool(torch.isnan(flat[row]).any()) else "infinite values"
    raise MergeCliError(
        f"{where}.x: {what} has {kind} in row {first_row + row} ({len(bad)} row(s) with NaN "
        "or inf in all); clean or drop those rows"
    )


def _read_tensors(
    path: Path, names: tuple[str, ...], where: str, shapes_only: bool = False
) -> tuple[Tensor, ...] | None:
    """Read the named arrays (x, y and maybe the mask) from a .safetensors or .npz file
    (``shapes_only``: check the file and its keys, read nothing)."""
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".npz"):
        raise MergeCliError(
            f"{where}.path: {path} has unsupported extension {path.suffix!r}; "
            "use a .safetensors or .npz file"
        )
    if not path.is_file():
        raise MergeCliError(
            f"{where}.path: file not found: {path} (working directory {os.getcwd()}); "
            "check the path"
        )
    fix = "re-save it with safetensors.torch.save_file or numpy.savez"
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                present = sorted(f.keys())
                _check_keys(present, names, path, where)
                if shapes_only:
                    return None
                return tuple(f.get_tensor(name) for name in names)
        with np.load(path, allow_pickle=False) as f:
            present = sorted(f.files)
            _check_keys(present, names, path, where)
            if shapes_only:
                return None
            return tuple(torch.from_numpy(np.asarray(f[name])) for name in names)
    except MergeCliError:
        raise
    except Exception as exc:  # safetensors and zipfile raise a zoo of types on corrupt files
        raise MergeCliError(f"{where}.path: cannot read {path} ({describe(exc)}); {fix}") from exc


def _check_keys(present: list[str], names: tuple[str, ...], path: Path, where: str) -> None:
    """Fail naming the option, the file and the keys it does hold."""
    for option, name in zip(("x", "y", "mask"), names, strict=False):
        if name not in present:
            listed = ", ".join(present) if present else "none"
            raise MergeCliError(
                f"{where}.{option}: key {name!r} not in {path} (keys present: {listed}); "
                f"set {option} to one of them"
            )


def load_tensors(spec: Mapping[str, Any], where: str) -> TensorData:
    """The ``tensors`` source: arrays ``x`` and ``y`` from a .safetensors or .npz file."""
    raw_path = spec.get("path")
    if not isinstance(raw_path, (str, os.PathLike)) or not str(raw_path):
        raise MergeCliError(
            f"{where}.path: source 'tensors' needs a path to a .safetensors or .npz file"
        )
    path = Path(raw_path).expanduser()
    x_key = _key(spec, "x", "x", where)
    y_key = _key(spec, "y", "y", where)
    mask_key = spec.get("mask")
    names = (x_key, y_key) if mask_key is None else (x_key, y_key, _key(spec, "mask", "", where))
    read = _read_tensors(path, names, where)
    assert read is not None  # shapes_only is False
    x, y = read[:2]
    floating = x.is_floating_point()  # whole numbers (pixels, ids) cannot be NaN or inf
    x = _inputs(x, f"{x_key!r} in {path}", where)
    y = _labels(y, f"{y_key!r} in {path}", where)
    if x.shape[0] != y.shape[0]:
        raise MergeCliError(
            f"{where}: x ({x_key!r}, {x.shape[0]} rows) and y ({y_key!r}, {y.shape[0]} rows) "
            f"in {path} have different lengths; they must match"
        )
    mask = _attention_mask(read[2], x, f"{names[-1]!r} in {path}", where) if mask_key else None
    start, stop = _split(spec.get("split"), len(y), where)
    x, y = x[start:stop], y[start:stop]
    if len(y) == 0:
        raise MergeCliError(f"{where}.path: {path} holds no examples; use a non-empty file")
    if floating:
        _check_finite(x, f"{x_key!r} in {path}", where, first_row=start)
    if mask is not None:
        mask = mask[start:stop].contiguous()
    return TensorData(x.contiguous(), y.contiguous(), torch.arange(start, stop), mask)


def _attention_mask(mask: Tensor, x: Tensor, what: str, where: str) -> Tensor:
    """An attention mask for the token ids ``x``: (N, L) like them, 1 for a token and 0 for
    padding; returned as int64, as Hugging Face models take it."""
    if x.is_floating_point() or x.dim() != 2:
        raise MergeCliError(
            f"{where}.mask: an attention mask goes with token ids, integer inputs of shape "
            f"(N, L), but x is {str(x.dtype).removeprefix('torch.')} of shape "
            f"{tuple(x.shape)}; leave out mask, or give x as integer token ids"
        )
    if tuple(mask.shape) != tuple(x.shape):
        raise MergeCliError(
            f"{where}.mask: {what} has shape {tuple(mask.shape)}, the token ids "
            f"{tuple(x.shape)}; the mask has one entry per token"
        )
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise MergeCliError(
            f"{where}.mask: {what} holds values other than 0 and 1; an attention mask is 1 "
            "for a token and 0 for padding"
        )
    return mask.to(torch.int64)


def _split(split: Any, n: int, where: str) -> tuple[int, int]:
    """The rows [start, stop) that a tensors source's ``split`` selects out of ``n``."""
    if split is None or split == "all":
        return 0, n
    if not isinstance(split, str) or ":" not in split:
        raise MergeCliError(
            f"{where}.split: cannot use {split!r} with source 'tensors'; use 'all' or {SPLIT_HELP}"
        )
    return parse_slice(split, n, where)


def _factory(spec: Mapping[str, Any], where: str) -> tuple[str, Callable[..., Any]]:
    """Import the ``package.module:function`` named by ``factory``."""
    name = spec.get("factory")
    if not isinstance(name, str):
        raise MergeCliError(f"{where}.factory: expected 'package.module:function', got {name!r}")
    func = import_object(
        name, f"{where}.factory", form="package.module:function", example="mydata:load"
    )
    if not callable(func):
        raise MergeCliError(f"{where}.factory: {name!r} is not callable; name a function")
    return name, func


def load_python(spec: Mapping[str, Any], where: str) -> TensorData:
    """The ``python`` source: call a factory returning a dataset of (input, label) pairs."""
    name, func = _factory(spec, where)
    args = spec.get("args") or {}
    if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
        raise MergeCliError(f"{where}.args: expected a mapping of keyword arguments, got {args!r}")
    try:
        dataset = func(**args)
    except Exception as exc:
        raise MergeCliError(
            f"{where}.factory: {name}(**args) raised {describe(exc)}; fix the factory or its args"
        ) from exc
    try:
        n = len(dataset)
    except TypeError:
        raise MergeCliError(
            f"{where}.factory: {name} returned {type(dataset).__name__}, which has no len(); "
            "return a torch Dataset or list of (input, label) pairs"
        ) from None
    if n == 0:
        raise MergeCliError(f"{where}.factory: {name} returned an empty dataset; return examples")
    inputs: list[Tensor] = []
    labels: list[int] = []
    for i in range(n):
        try:
            item = dataset[i]
        except Exception as exc:
            raise MergeCliError(
                f"{where}.factory: dataset from {name} failed at item {i} ({describe(exc)})"
            ) from exc
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise MergeCliError(
                f"{where}.factory: item {i} of the dataset from {name} is "
                f"{type(item).__name__}, not an (input, label) pair; return (input, label)"
            )
        inputs.append(_item_input(item[0], i, name, where))
        labels.append(_item_label(item[1], i, name, where))
    try:
        x = torch.stack(inputs)
    except RuntimeError as exc:
        raise MergeCliError(
            f"{where}.factory: inputs from {name} have different shapes ({describe(exc)}); "
            "every input must have the same shape"
        ) from exc
    y = _labels(torch.tensor(labels, dtype=torch.int64), f"labels from {name}", where)
    floating = x.is_floating_point()
    x = _inputs(x, f"inputs from {name}", where)
    if floating:
        _check_finite(x, f"inputs from {name}", where)
    return TensorData(x, y)


def _item_input(value: Any, i: int, name: str, where: str) -> Tensor:
    """One dataset input as a tensor."""
    try:
        return torch.as_tensor(value)
    except Exception as exc:
        raise MergeCliError(
            f"{where}.factory: input of item {i} from {name} is not tensor-like "
            f"({describe(exc)}); return a tensor or array"
        ) from exc


def _item_label(value: Any, i: int, name: str, where: str) -> int:
    """One dataset label as a python int; floats and bools are rejected as likely mistakes."""
    if isinstance(value, (Tensor, np.ndarray)):
        t = torch.as_tensor(value)
        if t.numel() == 1 and not t.is_floating_point() and t.dtype != torch.bool:
            return int(t.item())
    elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    raise MergeCliError(
        f"{where}.factory: label of item {i} from {name} is {value!r} "
        f"({type(value).__name__}); labels must be ints"
    )


_SOURCES: dict[str, Callable[[Mapping[str, Any], str], TensorData]] = {
    "mnist": load_mnist,
    "tensors": load_tensors,
    "python": load_python,
    "text": load_text,
}


def describe_source(spec: Mapping[str, Any]) -> str:
    """A data spec in a few words for messages: the file, the factory, or the source."""
    source = spec.get("source")
    if source == "tensors":
        return f"tensors file {spec.get('path')}"
    if source == "python":
        return f"python factory {spec.get('factory')}"
    if source == "text":
        return f"text {spec.get('path')}"
    if source == "hf_dataset":
        split = f" split {spec['split']}" if spec.get("split") else ""
        return f"hf_dataset {spec.get('path')}{split}"
    if source in IMAGE_SOURCES:
        split = f" split {spec.get('split') or 'train'}" if source != "imagefolder" else ""
        return f"{source} {spec.get('root')}{split}"
    return f"{source} split {spec.get('split', 'train')!s}" if source == "mnist" else str(source)


def example_shape(spec: Mapping[str, Any], seed: int = 0, where: str = "data") -> list[int] | None:
    """The shape of one input example, without loading a data file: its header is enough.
    MNIST is bundled and small, so it is loaded (with every option checked); a python
    factory is imported but not called (None: its shape is known only once it runs); text is
    [seq_len], its files and tokenizer found but not read."""
    source = spec.get("source")
    if source == "tensors":
        return _tensors_example_shape(spec, where)
    if source == "python":
        _factory(spec, where)
        return None
    if source == "text":  # the files and the tokenizer are checked; tokenizing is the run's
        options = text_options(spec, where)
        tokenizers_module(where)
        return [options.seq_len]
    if source in IMAGE_SOURCES:  # the files listed, not decoded
        return image_example_shape(spec, where)
    if source == "hf_dataset":  # the files' headers (and the first image's)
        return hf_example_shape(spec, where)
    return list(load_data(spec, seed, where).x.shape[1:])


def _tensors_example_shape(spec: Mapping[str, Any], where: str) -> list[int]:
    """Checks `load_tensors` makes that need only the file's header: the file, its keys, the
    row counts, the split."""
    path = Path(str(spec.get("path"))).expanduser()
    names = (_key(spec, "x", "x", where), _key(spec, "y", "y", where))
    if spec.get("mask") is not None:
        mask = _key(spec, "mask", "", where)
        _read_tensors(path, (*names, mask), where, shapes_only=True)
        (x_shape, _), (mask_shape, _) = _header_arrays(path, (names[0], mask), where)
        if mask_shape != x_shape:
            raise MergeCliError(
                f"{where}.mask: {mask!r} in {path} has shape {tuple(mask_shape)}, the token ids "
                f"{tuple(x_shape)}; the mask has one entry per token"
            )
    _read_tensors(path, names, where, shapes_only=True)
    x_shape, y_shape = _header_shapes(path, names, where)
    if not x_shape:
        raise MergeCliError(f"{where}.x: {names[0]!r} in {path} is a scalar; inputs need (N, ...)")
    if len(y_shape) != 1 or x_shape[0] != y_shape[0]:
        raise MergeCliError(
            f"{where}: x ({names[0]!r}, shape {list(x_shape)}) and y ({names[1]!r}, shape "
            f"{list(y_shape)}) in {path} must have as many rows, with 1-D labels"
        )
    _split(spec.get("split"), x_shape[0], where)
    return list(x_shape[1:])


def example_dtype(spec: Mapping[str, Any], where: str = "data") -> torch.dtype:
    """The dtype the inputs of ``spec`` have once loaded (int64 token ids or float32), read
    from a tensors file's header; int64 for text (and an hf_dataset's text column); float32
    for the other sources."""
    if spec.get("source") == "text":
        return torch.int64
    if spec.get("source") == "hf_dataset":
        return torch.int64 if uses_text(spec, where) else torch.float32
    if spec.get("source") != "tensors":
        return torch.float32
    path = Path(str(spec.get("path"))).expanduser()
    names = (_key(spec, "x", "x", where), _key(spec, "y", "y", where))
    stored = _header_arrays(path, names, where)[0][1]
    return _inputs(torch.empty(0, dtype=stored), "", where).dtype


def _header_shapes(
    path: Path, names: tuple[str, str], where: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of the two named arrays, read from the file's headers alone."""
    (x_shape, _), (y_shape, _) = _header_arrays(path, names, where)
    return x_shape, y_shape


def _header_arrays(
    path: Path, names: tuple[str, str], where: str
) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The shape and dtype of each named array, read from the file's headers alone."""
    try:
        if path.suffix.lower() == ".safetensors":
            from mergecli.io.safetensors_format import header_entries, read_header

            header, start = read_header(path)
            entries = header_entries(header, start, path.stat().st_size)
            return [(tuple(entries[n].shape), entries[n].dtype) for n in names]
        arrays = []
        with zipfile.ZipFile(path) as archive:
            for name in names:
                with archive.open(f"{name}.npy") as member:
                    fmt = np.lib.format
                    first = fmt.read_magic(member) == (1, 0)
                    read = fmt.read_array_header_1_0 if first else fmt.read_array_header_2_0
                    shape, _, dtype = read(member)
                    stored = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
                    arrays.append((tuple(shape), stored))
        return arrays
    except Exception as exc:  # safetensors, zipfile and numpy headers: many kinds of corrupt
        raise MergeCliError(
            f"{where}.path: cannot read {path} ({describe(exc)}); re-save it with "
            "safetensors.torch.save_file or numpy.savez"
        ) from exc


def load_data(spec: Mapping[str, Any], seed: int = 0, where: str = "data") -> TensorData:
    """Load the dataset described by ``spec`` and apply its classes/balanced/fraction options."""
    if not isinstance(spec, Mapping):
        raise MergeCliError(f"{where}: expected a mapping with a 'source' key, got {spec!r}")
    source = spec.get("source")
    loader = _SOURCES.get(source) if isinstance(source, str) else None
    if loader is None and source not in (*IMAGE_SOURCES, "hf_dataset"):
        raise MergeCliError(
            f"{where}.source: unknown data source {source!r}; use one of: "
            + ", ".join([*_SOURCES, *IMAGE_SOURCES, "hf_dataset"])
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeCliError(f"{where}: seed must be an integer, got {seed!r}")
    if source == "hf_dataset":  # chooses its subset on the labels, then decodes
        return load_hf_dataset(spec, seed, where)
    if loader is None:  # an image source chooses its subset before decoding any image
        return load_images(spec, seed, where)
    return apply_subset(loader(spec, where), spec, seed, where)
