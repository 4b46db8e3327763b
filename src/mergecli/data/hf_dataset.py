"""The ``hf_dataset`` source: a dataset written by Hugging Face ``datasets`` (``save_to_disk`` of
a Dataset or a DatasetDict: Arrow files) or parquet files, with an image or a text column and an
integer label column.

The files are read with pyarrow (which ``datasets`` installs), never through ``datasets``
itself: only columns of data and the features' JSON are read, no loading script or formatter
named by the files runs, and an image is decoded from the bytes the dataset holds (a cell with
only a path, which ``datasets`` would open, even as a URL, is refused: nothing is downloaded).
Images go through the image sources' decoding, ``transform:`` and ``augment:``; text through the
text source's tokenization, one padded example per row (``task: classify``) or packed blocks
(``task: lm``)."""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergecli.data import imagefolder, text
from mergecli.data.batches import TensorData
from mergecli.data.images import augment_option, choose_rows, workers_option
from mergecli.data.subset import apply_subset
from mergecli.data.transforms import (
    BatchTransform,
    batch_steps,
    check_batch_steps,
    output_size,
    parse_transform,
)
from mergecli.errors import MergeCliError, describe

SOURCE = "hf_dataset"
INSTALL_HINT = "pip install 'mergecli[hf-datasets]'"
TASKS = ("classify", "lm")
LAYOUT = (
    "a directory written by save_to_disk (state.json, or dataset_dict.json for a DatasetDict), "
    "or parquet files (a .parquet file, a directory of them or a glob such as data/train-*.parquet)"
)
# The first pyarrow that does not unpickle a file's Python extension types.
SAFE_PYARROW = (14, 0, 1)
# Texts per call of the tokenizer (its batch speed-up, bounded memory).
CHUNK = 256


@dataclass(frozen=True)
class Found:
    """The files ``path:`` (and ``split:``) name, without their data: the format, the files in
    order, what to call them in messages, the columns and the features' JSON (may be empty)."""

    kind: str  # "arrow" (save_to_disk) or "parquet"
    files: list[Path]
    what: str
    schema: Any  # pyarrow.Schema
    features: Mapping[str, Any]


@dataclass(frozen=True)
class Columns:
    """The columns a spec reads: its input (an image or a text column) and its labels."""

    kind: str  # "image" or "text"
    input: str
    label: str | None  # None for task lm
    task: str


def pyarrow_module(where: str) -> Any:
    """pyarrow, imported only when such a dataset is read (it comes with the optional extra)."""
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet  # noqa: F401 - imported for pyarrow.parquet below
    except ImportError:
        raise MergeCliError(
            f"{where}: source '{SOURCE}' needs the datasets library (for pyarrow): {INSTALL_HINT}"
        ) from None
    if _version(pyarrow.__version__) < SAFE_PYARROW:
        # Older pyarrow unpickles a file's Python extension types (CVE-2023-47248): a file
        # would decide what code runs.
        raise MergeCliError(
            f"{where}: source '{SOURCE}' needs pyarrow 14.0.1 or newer (this is "
            f"{pyarrow.__version__}, which can run code a data file holds): pip install -U pyarrow"
        )
    return pyarrow


def _version(text: str) -> tuple[int, ...]:
    """A version's leading numbers: "14.0.1" -> (14, 0, 1), "15.0.0.dev12" -> (15, 0, 0)."""
    numbers = []
    for part in text.split(".")[:3]:
        lead = re.match(r"\d*", part).group()
        if not lead:
            break
        numbers.append(int(lead))
    return tuple(numbers)


def locate(spec: Mapping[str, Any], where: str) -> Found:
    """The files of ``path:`` (the split's for a DatasetDict) and their columns, from the
    files' headers alone."""
    pa = pyarrow_module(where)
    raw = spec.get("path")
    if not isinstance(raw, (str, os.PathLike)) or not str(raw):
        raise MergeCliError(f"{where}.path: source '{SOURCE}' needs `path:`, {LAYOUT}")
    path = Path(raw).expanduser()
    split = spec.get("split")
    if split is not None and (not isinstance(split, str) or not split):
        raise MergeCliError(f"{where}.split: expected a split's name, got {split!r}")
    if glob.has_magic(str(path)):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise MergeCliError(f"{where}.path: no file matches {path}; expected {LAYOUT}")
        return _parquet(files, str(path), split, where, pa)
    if path.is_file():
        return _parquet([path], str(path), split, where, pa)
    if not path.is_dir():
        raise MergeCliError(
            f"{where}.path: no dataset at {path} (working directory {os.getcwd()}): expected "
            f"{LAYOUT}; nothing is downloaded"
        )
    if (path / "dataset_dict.json").is_file():
        splits = _splits(path, where)
        if split is None:
            if "train" not in splits:
                raise MergeCliError(
                    f"{where}.split: {path} is a DatasetDict of splits {', '.join(splits)}; "
                    "name one in `split:`"
                )
            split = "train"
        if split not in splits:
            raise MergeCliError(
                f"{where}.split: no split {split!r} in {path} (splits: {', '.join(splits)})"
            )
        return _saved(path / split, f"{path} split {split}", where, pa)
    if (path / "state.json").is_file():
        if split is not None:
            raise MergeCliError(
                f"{where}.split: {path} holds one Dataset (save_to_disk of a Dataset, not a "
                "DatasetDict), which has no splits; remove `split`"
            )
        return _saved(path, str(path), where, pa)
    files = sorted(
        (p for p in path.rglob("*.parquet") if p.is_file()),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise MergeCliError(
            f"{where}.path: {path} holds neither a dataset saved by save_to_disk (no state.json "
            f"or dataset_dict.json) nor .parquet files; expected {LAYOUT}"
        )
    return _parquet(files, str(path), split, where, pa)


def _splits(path: Path, where: str) -> list[str]:
    """The splits dataset_dict.json lists."""
    listing = path / "dataset_dict.json"
    try:
        splits = json.loads(listing.read_text(encoding="utf-8"))["splits"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise MergeCliError(
            f"{where}.path: cannot read {listing} ({describe(exc)}); save the DatasetDict again"
        ) from exc
    if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
        raise MergeCliError(
            f"{where}.path: {listing} lists no splits ({splits!r}); save the DatasetDict again"
        )
    return splits


def _saved(directory: Path, what: str, where: str, pa: Any) -> Found:
    """A Dataset's directory: state.json names its Arrow files, in order."""
    state_file = directory / "state.json"
    fix = "save it again with save_to_disk"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise MergeCliError(
            f"{where}.path: cannot read {state_file} ({describe(exc)}); {fix}"
        ) from exc
    files = []
    for name in names:
        # A plain name in the directory: state.json cannot send the reader elsewhere.
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise MergeCliError(
                f"{where}.path: {state_file} names data file {name!r}, not a file name in "
                f"{directory}; {fix}"
            )
        if not (directory / name).is_file():
            raise MergeCliError(
                f"{where}.path: {directory} is not a complete saved dataset: {name} (listed in "
                f"state.json) is missing; {fix}"
            )
        files.append(directory / name)
    if not files:
        raise MergeCliError(f"{where}.path: {state_file} lists no data files; {fix}")
    schema = _arrow_schema(files[0], where, pa)
    features = _features(schema)
    if not features and (directory / "dataset_info.json").is_file():
        try:
            info = json.loads((directory / "dataset_info.json").read_text(encoding="utf-8"))
            features = info.get("features") or {}
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            features = {}  # the features only name classes; the columns are the schema's
    return Found("arrow", files, what, schema, features if isinstance(features, dict) else {})


def _parquet(files: list[Path], what: str, split: str | None, where: str, pa: Any) -> Found:
    if split is not None:
        raise MergeCliError(
            f"{where}.split: parquet files have no splits; point `path` at the split's files "
            "(e.g. data/train-*.parquet) and remove `split`"
        )
    other = [p for p in files if p.suffix.lower() != ".parquet"]
    if other:
        raise MergeCliError(f"{where}.path: {other[0]} is not a .parquet file; expected {LAYOUT}")
    try:
        schema = pa.parquet.read_schema(str(files[0]))
    except Exception as exc:  # pyarrow raises several types on a damaged file
        raise MergeCliError(
            f"{where}.path: cannot read {files[0]} as parquet ({describe(exc)}); write it again"
        ) from exc
    return Found("parquet", files, what, schema, _features(schema))


def _arrow_schema(file: Path, where: str, pa: Any) -> Any:
    try:
        with pa.memory_map(str(file)) as source:
            return _arrow_reader(source, pa).schema
    except Exception as exc:  # pyarrow raises several types on a damaged file
        raise MergeCliError(
            f"{where}.path: cannot read {file} as Arrow data ({describe(exc)}); save the "
            "dataset again with save_to_disk"
        ) from exc


def _arrow_reader(source: Any, pa: Any) -> Any:
    """An Arrow stream (what save_to_disk writes), or else the Arrow file format."""
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source)


def _features(schema: Any) -> dict[str, Any]:
    """The features' JSON that ``datasets`` keeps in the schema's metadata (empty if none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        features = json.loads(raw).get("info", {}).get("features") or {}
    except (ValueError, AttributeError):
        return {}  # the features only name classes; the columns are the schema's
    return features if isinstance(features, dict) else {}


def read_columns(found: Found, names: Sequence[str], where: str) -> Any:
    """The named columns, every row of the files in order, as one pyarrow Table (Arrow files
    are memory-mapped: no copy until a column is taken)."""
    pa = pyarrow_module(where)
    tables = []
    for file in found.files:
        try:
            if found.kind == "parquet":
                tables.append(pa.parquet.read_table(str(file), columns=list(names)))
            else:
                source = pa.memory_map(str(file))
                tables.append(_arrow_reader(source, pa).read_all().select(list(names)))
        except Exception as exc:  # pyarrow raises several types on damaged or foreign files
            raise MergeCliError(
                f"{where}.path: cannot read columns {', '.join(names)} of {file} "
                f"({describe(exc)}); write the dataset again"
            ) from exc
    try:
        return pa.concat_tables(tables)
    except Exception as exc:  # files of different schemas
        raise MergeCliError(
            f"{where}.path: the files of {found.what} differ in their columns ({describe(exc)}); "
            "give files of one dataset"
        ) from exc


def columns(spec: Mapping[str, Any], found: Found, where: str) -> Columns:
    """The input column (``image:`` or ``text:``, else a column named image or text) and the
    label column, checked against the files' columns and types."""
    pa = pyarrow_module(where)
    present = list(found.schema.names)
    task = spec.get("task") or "classify"
    if task not in TASKS:
        raise MergeCliError(f"{where}.task: expected classify or lm, got {task!r}")
    image, words = spec.get("image"), spec.get("text")
    if image is not None and words is not None:
        raise MergeCliError(f"{where}: give `image` or `text`, not both: one input column")
    if image is None and words is None:
        if "image" in present and task == "classify":
            image = "image"
        elif "text" in present:
            words = "text"
        else:
            raise MergeCliError(
                f"{where}: no column 'image' or 'text' in {found.what} (columns: "
                f"{_listed(present)}); set `image:` or `text:` to the input column"
            )
    kind, name = ("image", image) if image is not None else ("text", words)
    _column(name, kind, found, where)
    field = found.schema.field(name)
    if kind == "image" and not _is_image(field.type, pa):
        raise MergeCliError(
            f"{where}.image: column {name!r} of {found.what} holds {field.type}, not images "
            "(datasets' Image feature: a struct of bytes and path, or binary image files)"
        )
    if kind == "text" and not (
        pa.types.is_string(field.type) or pa.types.is_large_string(field.type)
    ):
        raise MergeCliError(
            f"{where}.text: column {name!r} of {found.what} holds {field.type}, not strings"
        )
    if task == "lm":
        if kind == "image":
            raise MergeCliError(f"{where}.task: lm reads a text column, not images")
        return Columns(kind, name, None, task)
    label = spec.get("label") or "label"
    _column(label, "label", found, where)
    label_type = found.schema.field(label).type
    if not pa.types.is_integer(label_type):
        hint = (
            " (encode the names as class ids, e.g. datasets' class_encode_column)"
            if pa.types.is_string(label_type) or pa.types.is_large_string(label_type)
            else ""
        )
        raise MergeCliError(
            f"{where}.label: column {label!r} of {found.what} holds {label_type}, not integer "
            f"class ids{hint}"
        )
    return Columns(kind, name, label, task)


def _column(name: Any, option: str, found: Found, where: str) -> None:
    if not isinstance(name, str) or not name:
        raise MergeCliError(f"{where}.{option}: expected a column name, got {name!r}")
    if name not in found.schema.names:
        raise MergeCliError(
            f"{where}.{option}: no column {name!r} in {found.what} (columns: "
            f"{_listed(list(found.schema.names))}); set `{option}:` to one of them"
        )


def _listed(names: list[str]) -> str:
    return ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") if names else "none"


def _is_image(kind: Any, pa: Any) -> bool:
    binary = (pa.types.is_binary, pa.types.is_large_binary)
    if any(test(kind) for test in binary):
        return True
    if not pa.types.is_struct(kind) or kind.get_field_index("bytes") < 0:
        return False
    return any(test(kind.field("bytes").type) for test in binary)


def class_names(found: Found, label: str) -> list[str] | None:
    """The class names of a ClassLabel label column, from the features' JSON."""
    feature = found.features.get(label)
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
        names = feature.get("names")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
    return None


def class_labels(classes: Any, names: list[str] | None, label: str, where: str) -> Any:
    """``classes:`` as labels: names are a ClassLabel column's (a number is a label itself)."""
    if classes is None or not isinstance(classes, (list, tuple)):
        return classes
    labels = []
    for value in classes:
        if isinstance(value, str):
            if names is None:
                raise MergeCliError(
                    f"{where}.classes: {value!r} is a name, but column {label!r} is no "
                    "ClassLabel with names; give class numbers"
                )
            if value not in names:
                shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
                raise MergeCliError(
                    f"{where}.classes: no class {value!r} in column {label!r} (classes: {shown})"
                )
            labels.append(names.index(value))
        else:
            labels.append(value)
    return labels


def labels_of(table: Any, cols: Columns, found: Found, where: str) -> Tensor:
    """The label column as int64 class ids; a missing or negative label names its row."""
    column = table.column(cols.label)
    nulls = column.null_count
    if nulls:
        row = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
        raise MergeCliError(
            f"{where}.label: row {row} of {found.what} has no label (column {cols.label!r}, "
            f"{nulls} row(s) in all); drop those rows"
        )
    y = torch.from_numpy(column.to_numpy().astype("int64"))
    negative = torch.nonzero(y < 0).flatten()
    if len(negative):
        row = int(negative[0])
        raise MergeCliError(
            f"{where}.label: label {int(y[row])} in row {row} of {found.what} (column "
            f"{cols.label!r}, {len(negative)} row(s) in all); labels must be class ids 0, 1, "
            "2, ... (-1 marks unlabelled rows, as in some test splits: use a labelled split)"
        )
    return y


def load_hf_dataset(spec: Mapping[str, Any], seed: int, where: str) -> TensorData:
    """The ``hf_dataset`` source ``spec``: images (uint8, with their transform), token ids with
    an attention mask and labels, or packed token blocks; after ``classes``, ``partition``,
    ``balanced`` and ``fraction`` (chosen on the labels before anything is decoded)."""
    found = locate(spec, where)
    cols = columns(spec, found, where)
    if cols.task == "lm":
        for option in ("classes", "balanced", "partition", "class_fractions"):
            if spec.get(option) not in (None, False):
                raise MergeCliError(
                    f"{where}.{option}: task lm has no classes (its labels are all 0); remove "
                    "it (`fraction` keeps a share of the blocks)"
                )
        table = read_columns(found, [cols.input], where)
        blocks = _blocks(table, cols, found, spec, where)
        data = TensorData(blocks, torch.zeros(len(blocks), dtype=torch.int64))
        return apply_subset(data, spec, seed, where)
    if cols.kind == "image":
        steps = parse_transform(spec.get("transform"), f"{where}.transform")
        augment = augment_option(spec, steps, where)
        workers = workers_option(spec, where)
        mode = imagefolder.image_mode(spec, where)
    table = read_columns(found, [cols.input, cols.label], where)
    y = labels_of(table, cols, found, where)
    names = class_names(found, cols.label)
    chosen_spec = {**spec, "classes": class_labels(spec.get("classes"), names, cols.label, where)}
    chosen = choose_rows(y, chosen_spec, seed, where)
    cells = table.column(cols.input).take(chosen.rows.numpy())
    if cols.kind == "text":
        ids, mask = _token_rows(cells.to_pylist(), chosen.rows.tolist(), cols, found, spec, where)
        return TensorData(ids, chosen.y, chosen.rows, mask)
    encoded = _encoded_images(cells.to_pylist(), chosen.rows.tolist(), cols, found, where)
    imagefolder.pillow(where, SOURCE)
    names_by_row = [f"row {r}" for r in chosen.rows.tolist()]
    x = imagefolder.decode_images(encoded, names_by_row, "image", mode, steps, workers, where)
    check_batch_steps(batch_steps(steps), *x.shape[1:], f"{where}.transform")
    transform = BatchTransform(batch_steps(steps), augment)
    return TensorData(x, chosen.y, chosen.rows, transform=transform)


def _encoded_images(
    cells: list[Any], rows: list[int], cols: Columns, found: Found, where: str
) -> list[tuple[bytes, str]]:
    """Each cell's image file bytes, with what to call it; an empty cell or one holding only a
    path (never opened: it may name any file or a URL) names its row."""
    encoded = []
    for row, cell in zip(rows, cells, strict=True):
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not data:
            path = cell.get("path") if isinstance(cell, dict) else None
            held = f"only the path {path!r}, not the image's bytes" if path else "no image"
            raise MergeCliError(
                f"{where}.image: row {row} of {found.what} (column {cols.input!r}) holds {held}; "
                "nothing outside the dataset is read: save it with the images in it "
                "(datasets' Image feature embeds them in save_to_disk and to_parquet)"
            )
        encoded.append((data, f"the image in row {row} of {found.what}"))
    return encoded


def _tokenizer(spec: Mapping[str, Any], where: str) -> tuple[Any, Path, int | None]:
    file = text.tokenizer_file(spec.get("tokenizer"), where, SOURCE)
    tokenizer, eos = text.load_tokenizer(file, where, SOURCE)
    return tokenizer, file, eos


def pad_id(tokenizer: Any, file: Path, eos: int | None, where: str) -> int:
    """The id padding takes: tokenizer_config.json's pad_token, else the tokenizer's own padding
    id, else its EOS token (as GPT-2-style models pad), else 0."""
    configured = text.config_token_id(tokenizer, file, "pad_token", where)
    if configured is not None:
        return configured
    if tokenizer.padding is not None and tokenizer.padding.get("pad_id") is not None:
        return int(tokenizer.padding["pad_id"])
    return eos if eos is not None else 0


def _texts(cells: list[Any], rows: list[int], cols: Columns, found: Found, where: str) -> None:
    for row, cell in zip(rows, cells, strict=True):
        if cell is None:
            raise MergeCliError(
                f"{where}.text: row {row} of {found.what} has no text (column {cols.input!r} is "
                "empty there); drop that row"
            )


def _token_rows(
    cells: list[Any],
    rows: list[int],
    cols: Columns,
    found: Found,
    spec: Mapping[str, Any],
    where: str,
) -> tuple[Tensor, Tensor]:
    """One example per row: its text tokenized (with the tokenizer's special tokens, as
    transformers does by default), cut to ``seq_len`` and padded to it, with the attention
    mask (1 token, 0 padding)."""
    _texts(cells, rows, cols, found, where)
    seq_len = text.positive(spec, "seq_len", text.DEFAULT_SEQ_LEN, where)
    tokenizer, file, eos = _tokenizer(spec, where)
    pad = pad_id(tokenizer, file, eos, where)
    tokenizer.enable_truncation(max_length=seq_len)
    tokenizer.enable_padding(
        length=seq_len, pad_id=pad, pad_token=tokenizer.id_to_token(pad) or "[PAD]"
    )
    ids, mask = [], []
    for start in range(0, len(cells), CHUNK):
        for encoding in tokenizer.encode_batch(cells[start : start + CHUNK]):
            ids.append(encoding.ids)
            mask.append(encoding.attention_mask)
    x = torch.tensor(ids, dtype=torch.int64).reshape(len(cells), seq_len)
    m = torch.tensor(mask, dtype=torch.int64).reshape(len(cells), seq_len)
    empty = torch.nonzero(m.sum(dim=1) == 0).flatten()
    if len(empty):
        raise MergeCliError(
            f"{where}.text: row {rows[int(empty[0])]} of {found.what} has no tokens (column "
            f"{cols.input!r} is an empty text; {len(empty)} row(s) in all); drop those rows"
        )
    return x, m


def _blocks(table: Any, cols: Columns, found: Found, spec: Mapping[str, Any], where: str) -> Tensor:
    """Every row's text tokenized and followed by EOS, concatenated and cut into ``seq_len``
    blocks, as the text source makes them."""
    cells = table.column(cols.input).to_pylist()
    _texts(cells, list(range(len(cells))), cols, found, where)
    seq_len = text.positive(spec, "seq_len", text.DEFAULT_SEQ_LEN, where)
    max_tokens = text.positive(spec, "max_tokens", None, where)
    tokenizer, _, eos = _tokenizer(spec, where)
    pieces: list[Tensor] = []
    total = 0
    for start in range(0, len(cells), CHUNK):
        total += text.encode_documents(tokenizer, cells[start : start + CHUNK], eos, pieces)
        if max_tokens is not None and total >= max_tokens:
            break
    tokens = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
    tokens = tokens[:max_tokens] if max_tokens is not None else tokens
    return text.pack_blocks(tokens, seq_len, f"{found.what} holds", where)


def hf_example_shape(spec: Mapping[str, Any], where: str) -> list[int]:
    """The shape of one input, from the files' headers (and for images sized by no transform
    step, the first image's header): the columns, their types and the options are checked."""
    found = locate(spec, where)
    cols = columns(spec, found, where)
    if cols.label is not None:
        class_labels(spec.get("classes"), class_names(found, cols.label), cols.label, where)
    if cols.kind == "text":
        seq_len = text.positive(spec, "seq_len", text.DEFAULT_SEQ_LEN, where)
        text.tokenizer_file(spec.get("tokenizer"), where, SOURCE)
        text.tokenizers_module(where, SOURCE)
        return [seq_len]
    steps = parse_transform(spec.get("transform"), f"{where}.transform")
    augment_option(spec, steps, where)
    workers_option(spec, where)
    channels = 3 if imagefolder.image_mode(spec, where) == "RGB" else 1
    sized = any(
        step.name == "center_crop" or (step.name == "resize" and not isinstance(step.size, int))
        for step in steps
    )
    height, width = (1, 1) if sized else _first_size(found, cols, where)
    height, width = output_size(steps, height, width)
    check_batch_steps(batch_steps(steps), channels, height, width, f"{where}.transform")
    return [channels, height, width]


def _first_size(found: Found, cols: Columns, where: str) -> tuple[int, int]:
    """The (height, width) of the first row's image, reading one batch (or row group)."""
    pa = pyarrow_module(where)
    first = None
    try:
        if found.kind == "parquet":
            parquet = pa.parquet.ParquetFile(str(found.files[0]))
            if parquet.metadata.num_row_groups:
                group = parquet.read_row_group(0, columns=[cols.input])
                first = group.column(0)[0].as_py() if group.num_rows else None
        else:
            with pa.memory_map(str(found.files[0])) as source:
                for batch in _arrow_reader(source, pa):
                    if batch.num_rows:
                        first = batch.column(batch.schema.get_field_index(cols.input))[0].as_py()
                        break
    except Exception as exc:  # pyarrow raises several types on a damaged file
        raise MergeCliError(
            f"{where}.path: cannot read {found.files[0]} ({describe(exc)}); write it again"
        ) from exc
    if first is None:
        raise MergeCliError(f"{where}.path: {found.what} holds no rows; use a non-empty dataset")
    ((data, what),) = _encoded_images([first], [0], cols, found, where)
    image_module = imagefolder.pillow(where, SOURCE)
    try:
        import io

        with image_module.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception as exc:  # Pillow raises many types on a damaged file
        raise MergeCliError(
            f"{where}.image: cannot decode {what} ({describe(exc)}); replace or remove it"
        ) from exc
    return height, width


def uses_text(spec: Mapping[str, Any], where: str) -> bool:
    """Whether the spec's input column is text (its inputs then are int64 token ids)."""
    if spec.get("text") is not None or spec.get("task") == "lm":
        return True
    if spec.get("image") is not None:
        return False
    return columns(spec, locate(spec, where), where).kind == "text"
