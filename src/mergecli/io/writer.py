"""Write state dicts as safetensors (single file or HF-style shards), atomically."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch

from mergecli.errors import MergeCliError
from mergecli.io.checkpoint import INDEX_NAME
from mergecli.io.safetensors_format import write_safetensors

SINGLE_NAME = "model.safetensors"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def shard_name(index: int, count: int) -> str:
    """HF shard file name for 1-based ``index`` of ``count`` shards."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def _prepare(
    state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Detach, cast floats to ``dtype``, move to CPU, make contiguous and unshare storage."""
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state_dict key {name!r} is not a string")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach().to("cpu")
        # Integer/bool buffers (num_batches_tracked, position ids) must keep their exact values.
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        # safetensors refuses tensors that share memory (tied weights); give each its own copy.
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen_storage:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if t.numel():
            seen_storage.add(ptr)
        out[name] = t
    return out


def _plan_shards(tensors: dict[str, torch.Tensor], shard_size: int | None) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most ``shard_size`` bytes each."""
    if shard_size is None:
        return [list(tensors)]
    if shard_size <= 0:
        raise ValueError(f"shard_size must be a positive number of bytes, got {shard_size}")
    shards: list[list[str]] = [[]]
    current = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        # An oversized tensor still gets written: alone in its own shard.
        if shards[-1] and current + size > shard_size:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def _fsync_file(path: Path) -> None:
    """Flush a written file to disk so a rename never exposes a file with missing data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Persist the renames; best effort, since some platforms cannot fsync a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(out_dir: Path, exc: BaseException) -> MergeCliError:
    """Build the one-line error for an output directory that cannot be created or written."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return MergeCliError(
        f"{out_dir}: cannot write the output directory ({reason}); "
        "choose another output.dir or fix its permissions"
    )


def _stale_outputs(out_dir: Path, keep: set[str]) -> list[Path]:
    """Files of an earlier save (either layout) that the new save does not overwrite."""
    stale = []
    # The index goes first: while it exists, readers ignore a lone model.safetensors.
    for name in (INDEX_NAME, SINGLE_NAME):
        if name not in keep and (out_dir / name).is_file():
            stale.append(out_dir / name)
    stale += sorted(f for f in out_dir.iterdir() if _SHARD_RE.match(f.name) and f.name not in keep)
    return stale


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    out_dir: str | Path,
    metadata: dict[str, str] | None = None,
    shard_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Atomically write ``state_dict`` to ``out_dir`` and return the final file paths.

    Writes ``model.safetensors``, or, when ``shard_size`` (bytes) is given and the tensors
    exceed it, ``model-0000i-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``
    (returned last). Tensors keep their order; a shard is closed when the next tensor would
    overflow it, and a tensor larger than ``shard_size`` gets a shard of its own. ``dtype``
    casts floating-point tensors only. ``metadata`` (keys and values coerced to ``str``) goes
    into every file's ``__metadata__`` and into the index's ``metadata`` next to ``total_size``.

    All files are written under temporary names (``.NAME.tmp-PID``) and fsync'd, then renamed
    into place shards first, index last. On failure the temporary files and any already-renamed
    new files are removed. Outputs of the other layout (or an old shard count) left from an
    earlier save are deleted only once the new files are in place.
    """
    out = Path(out_dir)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    tensors = _prepare(state_dict, dtype)
    groups = _plan_shards(tensors, shard_size)

    if len(groups) == 1:
        names = [SINGLE_NAME]
    else:
        names = [shard_name(i + 1, len(groups)) for i in range(len(groups))]
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(out, exc) from exc

    pid = os.getpid()
    pending: list[tuple[Path, Path]] = []  # (temporary, final), in rename order
    renamed: list[Path] = []
    try:
        for name, group in zip(names, groups, strict=True):
            tmp = out / f".{name}.tmp-{pid}"
            pending.append((tmp, out / name))
            write_safetensors(tmp, {n: tensors[n] for n in group}, meta)
            _fsync_file(tmp)
        if len(names) > 1:
            # total_size must describe this save even if the caller's metadata has the key.
            extra = {k: v for k, v in meta.items() if k != "total_size"}
            index = {
                "metadata": {"total_size": total_size, **extra},
                "weight_map": {
                    n: name for name, group in zip(names, groups, strict=True) for n in group
                },
            }
            tmp = out / f".{INDEX_NAME}.tmp-{pid}"
            pending.append((tmp, out / INDEX_NAME))
            with tmp.open("w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        for tmp, final in pending:
            os.replace(tmp, final)
            renamed.append(final)
    except BaseException as exc:
        for tmp, _ in pending:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        # A half-renamed set would pair new shards with an old index; remove the new ones.
        for final in renamed:
            with contextlib.suppress(OSError):
                final.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(out, exc) from exc
        raise
    _fsync_dir(out)

    finals = [final for _, final in pending]
    try:
        for stale in _stale_outputs(out, {f.name for f in finals}):
            stale.unlink(missing_ok=True)
    except OSError as exc:
        raise _write_error(out, exc) from exc
    return finals
