"""The ``text`` source: .txt and .jsonl files tokenized with a Hugging Face ``tokenizers``
tokenizer, packed into ``seq_len`` blocks of token ids, and cached so a corpus is tokenized once."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergecli.data.batches import TensorData
from mergecli.errors import MergeCliError, describe

DEFAULT_SEQ_LEN = 256
DEFAULT_FIELD = "text"
SUFFIXES = (".txt", ".jsonl")
# Documents per call of the tokenizer: large enough for its batch speed-up, small enough that
# `max_tokens` stops the reading soon after it is reached.
CHUNK = 256
# Bumped when what is cached for the same inputs changes (the key includes it).
CACHE_VERSION = "1"
INSTALL_HINT = "pip install 'mergecli[hf]'"


@dataclass(frozen=True)
class TextOptions:
    """A text spec's options, checked."""

    files: list[Path]
    tokenizer: Path  # the tokenizer.json file
    field: str
    seq_len: int
    max_tokens: int | None
    cache: Path | None  # None: no cache


def load_text(spec: Mapping[str, Any], where: str) -> TensorData:
    """The ``text`` source: token ids ``x`` (N, seq_len) int64 and zero labels ``y``."""
    options = text_options(spec, where)
    key = cache_key(options)
    blocks = _read_cache(options.cache, key)
    if blocks is None:
        tokens = read_tokens(options, where)
        blocks = pack(tokens, options.seq_len, options, where)
        if options.cache is not None:
            _write_cache(options.cache, key, blocks, where)
    return TensorData(blocks, torch.zeros(len(blocks), dtype=torch.int64))


def with_default_tokenizer(spec: dict[str, Any], reference: str | os.PathLike) -> dict[str, Any]:
    """A text spec without `tokenizer:` takes the reference checkpoint's directory when that is
    a model directory (where save_pretrained puts tokenizer.json); so does an hf_dataset spec
    (read only if its input column turns out to be text); other specs are unchanged."""
    if spec.get("source") not in ("text", "hf_dataset") or spec.get("tokenizer") is not None:
        return spec
    if spec.get("source") == "hf_dataset" and spec.get("image") is not None:
        return spec
    if not Path(reference).expanduser().is_dir():
        return spec
    return {**spec, "tokenizer": str(reference)}


def text_options(spec: Mapping[str, Any], where: str) -> TextOptions:
    """Check a text spec without reading its documents: the files, the tokenizer file, the
    numbers; refuse the class options, which have no meaning for text."""
    for option in ("classes", "balanced", "class_fractions"):
        if spec.get(option) not in (None, False):
            raise MergeCliError(
                f"{where}.{option}: source 'text' has no classes (its labels are all 0); "
                "remove it (`fraction` keeps a share of the blocks)"
            )
    raw_path = spec.get("path")
    if not isinstance(raw_path, (str, os.PathLike)) or not str(raw_path):
        raise MergeCliError(
            f"{where}.path: source 'text' needs a path to a .txt or .jsonl file or a directory"
        )
    files = text_files(Path(raw_path).expanduser(), where)
    field = spec.get("field", DEFAULT_FIELD)
    if field is None:
        field = DEFAULT_FIELD
    if not isinstance(field, str) or not field:
        raise MergeCliError(f"{where}.field: expected a non-empty string, got {field!r}")
    seq_len = positive(spec, "seq_len", DEFAULT_SEQ_LEN, where)
    max_tokens = positive(spec, "max_tokens", None, where)
    return TextOptions(
        files, tokenizer_file(spec.get("tokenizer"), where), field, seq_len, max_tokens,
        cache_dir(spec.get("cache"), where),
    )  # fmt: skip


def positive(spec: Mapping[str, Any], name: str, default: int | None, where: str) -> int | None:
    """A positive integer option of ``spec``, or ``default``."""
    value = spec.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MergeCliError(f"{where}.{name}: expected a positive integer, got {value!r}")
    return value


def text_files(path: Path, where: str) -> list[Path]:
    """``path`` itself, or every .txt and .jsonl file under the directory ``path`` (sorted by
    their path inside it, so the order, and the cache key, do not depend on the file system)."""
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise MergeCliError(f"{where}.path: no .txt or .jsonl file under {path}; add text")
        return files
    if not path.exists():
        raise MergeCliError(
            f"{where}.path: file not found: {path} (working directory {os.getcwd()}); "
            "check the path"
        )
    if path.suffix.lower() not in SUFFIXES:
        raise MergeCliError(
            f"{where}.path: {path} has unsupported extension {path.suffix!r}; use a .txt or "
            ".jsonl file, or a directory of them"
        )
    return [path]


def tokenizer_file(value: Any, where: str, source: str = "text") -> Path:
    """The tokenizer.json that ``tokenizer:`` names (the file, or a directory holding it)."""
    if value is None:
        raise MergeCliError(
            f"{where}.tokenizer: source '{source}' needs a tokenizer: set `tokenizer:` to a "
            "tokenizer.json or a model directory holding one (the default, the reference "
            "checkpoint's directory, applies only when it is a model directory)"
        )
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise MergeCliError(f"{where}.tokenizer: expected a path, got {value!r}")
    path = Path(value).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise MergeCliError(
            f"{where}.tokenizer: no tokenizer found: looked for {file}; give `tokenizer:` as a "
            "tokenizer.json file or a directory holding one (save it with "
            "tokenizer.save_pretrained)"
        )
    return file


def cache_dir(value: Any, where: str) -> Path | None:
    """Where tokenized blocks are kept: ``cache:`` (false: nowhere), else $MERGECLI_CACHE/text,
    else ~/.cache/mergecli/text."""
    if value is False:
        return None
    if value is None or value is True:
        root = os.environ.get("MERGECLI_CACHE")
        return Path(root).expanduser() / "text" if root else Path.home() / ".cache/mergecli/text"
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise MergeCliError(f"{where}.cache: expected a directory or false, got {value!r}")
    return Path(value).expanduser()


def cache_key(options: TextOptions) -> str:
    """sha256 over what the blocks depend on: every file's bytes (in order, each its own
    record, so moving text between files changes the key), the tokenizer and its config (the
    EOS token), the field, seq_len and max_tokens. Paths are left out: a moved corpus hits."""
    digest = hashlib.sha256(f"mergecli-text:{CACHE_VERSION}".encode())
    config = options.tokenizer.parent / "tokenizer_config.json"
    inputs = [*options.files, options.tokenizer] + ([config] if config.is_file() else [])
    for path in inputs:
        digest.update(b"\0file:" + _file_digest(path).encode())
    settings = [options.field, options.seq_len, options.max_tokens, len(options.files)]
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def documents(path: Path, field: str, where: str) -> Iterator[str]:
    """The documents of one file: blank-line-separated paragraphs of a .txt file, or the
    ``field`` of each line of a .jsonl file. A file without any is refused, naming it."""
    found = False
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeCliError(
            f"{where}.path: cannot read {path} ({describe(exc)}); give UTF-8 text"
        ) from exc
    if path.suffix.lower() == ".txt":
        paragraph: list[str] = []
        for line in [*text.splitlines(), ""]:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                found = True
                yield "\n".join(paragraph)
                paragraph = []
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                found = True
                yield _jsonl_document(line, field, f"{path}:{number}", where)
    if not found:
        raise MergeCliError(f"{where}.path: {path} holds no text; remove it or add documents")


def _jsonl_document(line: str, field: str, at: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MergeCliError(
            f"{where}.path: {at}: not a JSON object ({exc.msg}); write one object per line"
        ) from None
    if not isinstance(record, dict):
        raise MergeCliError(
            f"{where}.path: {at}: a JSON {type(record).__name__}, not an object; write one "
            f'object per line, e.g. {{"{field}": "..."}}'
        )
    if field not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise MergeCliError(
            f"{where}.field: {at}: no field {field!r} (fields: {keys}); set `field:` to the one "
            "holding the text"
        )
    value = record[field]
    if not isinstance(value, str):
        raise MergeCliError(
            f"{where}.field: {at}: field {field!r} is a {type(value).__name__}, not a string"
        )
    return value


def tokenizers_module(where: str, source: str = "text") -> Any:
    """The ``tokenizers`` library, imported only when text is read (an optional extra)."""
    try:
        import tokenizers
    except ImportError:
        raise MergeCliError(
            f"{where}: source '{source}' needs the tokenizers library: {INSTALL_HINT}"
        ) from None
    return tokenizers


def load_tokenizer(file: Path, where: str, source: str = "text") -> tuple[Any, int | None]:
    """The tokenizer in ``file`` and the id of its EOS token (tokenizer_config.json's
    ``eos_token`` beside it; None without one)."""
    tokenizers = tokenizers_module(where, source)
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises its own Exception type on a bad file
        raise MergeCliError(
            f"{where}.tokenizer: cannot read {file} ({describe(exc)}); give a tokenizer.json "
            "written by tokenizers or transformers"
        ) from exc
    return tokenizer, config_token_id(tokenizer, file, "eos_token", where)


def config_token_id(tokenizer: Any, file: Path, name: str, where: str) -> int | None:
    """The id of the special token ``name`` (eos_token, pad_token) that tokenizer_config.json
    beside the tokenizer file names; None without one."""
    config = file.parent / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        token = json.loads(config.read_text(encoding="utf-8")).get(name)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise MergeCliError(f"{where}.tokenizer: cannot read {config} ({describe(exc)})") from exc
    if isinstance(token, dict):  # older transformers wrote an AddedToken as a mapping
        token = token.get("content")
    if not isinstance(token, str) or not token:
        return None
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise MergeCliError(
            f"{where}.tokenizer: {name} {token!r} of {config} is not in the tokenizer's "
            "vocabulary; fix tokenizer_config.json"
        )
    return int(token_id)


def read_tokens(options: TextOptions, where: str) -> Tensor:
    """Every document's token ids (with the tokenizer's special tokens, as transformers adds
    them by default) followed by EOS, concatenated; at most ``max_tokens``."""
    tokenizer, eos = load_tokenizer(options.tokenizer, where)
    pieces: list[Tensor] = []
    total = 0
    for path in options.files:
        chunk: list[str] = []
        for document in documents(path, options.field, where):
            chunk.append(document)
            if len(chunk) == CHUNK:
                total += encode_documents(tokenizer, chunk, eos, pieces)
                chunk = []
                if options.max_tokens is not None and total >= options.max_tokens:
                    break
        else:
            if chunk:
                total += encode_documents(tokenizer, chunk, eos, pieces)
        if options.max_tokens is not None and total >= options.max_tokens:
            break
    tokens = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
    return tokens[: options.max_tokens] if options.max_tokens is not None else tokens


def encode_documents(
    tokenizer: Any, chunk: list[str], eos: int | None, pieces: list[Tensor]
) -> int:
    """Tokenize ``chunk``, append each document's ids (and EOS) to ``pieces``; their count."""
    count = 0
    for encoding in tokenizer.encode_batch(chunk):
        ids = list(encoding.ids)
        if eos is not None and (not ids or ids[-1] != eos):  # a post-processor may add it
            ids.append(eos)
        pieces.append(torch.tensor(ids, dtype=torch.int64))
        count += len(ids)
    return count


def pack(tokens: Tensor, seq_len: int, options: TextOptions, where: str) -> Tensor:
    """Consecutive ``seq_len`` blocks of ``tokens`` (N, seq_len); the remainder is dropped."""
    names = ", ".join(str(p) for p in options.files[:3])
    names += f" and {len(options.files) - 3} more" if len(options.files) > 3 else ""
    return pack_blocks(tokens, seq_len, f"{names} hold", where)


def pack_blocks(tokens: Tensor, seq_len: int, what: str, where: str) -> Tensor:
    """Consecutive ``seq_len`` blocks of ``tokens``; ``what`` ("FILE holds") names them in the
    message when there are too few for one."""
    blocks = len(tokens) // seq_len
    if blocks == 0:
        raise MergeCliError(
            f"{where}: {what} {len(tokens)} tokens, fewer than one block of seq_len "
            f"{seq_len}; lower seq_len or add text"
        )
    return tokens[: blocks * seq_len].reshape(blocks, seq_len).contiguous()


def _cache_file(cache: Path, key: str) -> Path:
    return cache / f"{key}.safetensors"


def _read_cache(cache: Path | None, key: str) -> Tensor | None:
    """The blocks cached under ``key``, or None (no cache, a miss, or an unreadable file)."""
    if cache is None:
        return None
    path = _cache_file(cache, key)
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        blocks = load_file(str(path))["blocks"]
    except Exception:  # noqa: BLE001 - a damaged cache entry is a miss; it is written again
        return None
    return blocks if blocks.dim() == 2 and blocks.dtype == torch.int64 else None


def _write_cache(cache: Path, key: str, blocks: Tensor, where: str) -> None:
    """Save the packed blocks in the cache."""
    from mergecli.io.atomic import write_cache_entry

    try:
        write_cache_entry(_cache_file(cache, key), {"blocks": blocks}, {"mergecli.text_cache": key})
    except OSError as exc:
        raise MergeCliError(
            f"{where}.cache: cannot write the token cache in {cache} ({describe(exc)}); set "
            "`cache:` to a writable directory (or MERGECLI_CACHE), or `cache: false`"
        ) from exc
