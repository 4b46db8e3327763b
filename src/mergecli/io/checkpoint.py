"""Find, read and fingerprint safetensors checkpoints (single files, HF dirs, sharded dirs)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from mergecli.errors import MergeCliError

INDEX_NAME = "model.safetensors.index.json"
_CHUNK = 1 << 20
_CONVERT_HINT = (
    "only safetensors checkpoints are read; convert it with "
    "`safetensors.torch.save_file(torch.load(f), 'x.safetensors')`"
)


@dataclass
class Layout:
    """Where a checkpoint's bytes live: its root, its index (if sharded) and its shard files."""

    root: Path
    files: list[Path]
    index: Path | None = None
    weight_map: dict[str, str] = field(default_factory=dict)


def checkpoint_layout(path: str | Path) -> Layout:
    """Where the checkpoint at ``path`` (a file, a sharded dir or a dir with one file) keeps its
    tensors; a MergeCliError says what to fix when it is none of these."""
    p = Path(path)
    if not p.exists():
        raise _missing(p)
    if p.is_dir():
        return _resolve_dir(p)
    if not p.is_file():
        raise MergeCliError(f"{p}: not a regular file or directory; check the path")
    if p.name.endswith(".safetensors.index.json"):
        raise MergeCliError(
            f"{p}: this is a shard index; pass the directory that contains it ({p.parent})"
        )
    if p.suffix != ".safetensors":
        raise MergeCliError(f"{p}: not a .safetensors file; {_CONVERT_HINT}")
    return Layout(root=p.parent, files=[p])


def _missing(p: Path) -> MergeCliError:
    """Why an existing-looking path cannot be opened: a symlink loop or dangling link (which
    `Path.exists` reports as absent), else it is not there."""
    try:
        os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return MergeCliError(
                f"{p}: symbolic link loop (the links never reach a file); "
                "point the path at the checkpoint itself"
            )
    if p.is_symlink():
        return MergeCliError(
            f"{p}: symbolic link to {os.readlink(p)}, which does not exist; "
            "fix the link or the path"
        )
    return MergeCliError(f"{p}: no such file or directory; check the path")


def _resolve_dir(d: Path) -> Layout:
    """Resolve a checkpoint directory via its index, or its one and only safetensors file."""
    index = d / INDEX_NAME
    if index.is_file():
        return _resolve_index(d, index)
    files = sorted(f for f in d.iterdir() if f.name.endswith(".safetensors") and f.is_file())
    if not files:
        raise MergeCliError(
            f"{d}: directory contains no .safetensors file; "
            "point to a checkpoint file or a directory that holds one"
        )
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise MergeCliError(
            f"{d}: directory holds several .safetensors files ({names}) but no {INDEX_NAME}; "
            f"point to one of the files or add an index that maps tensors to shards"
        )
    return Layout(root=d, files=files)


def _resolve_index(d: Path, index: Path) -> Layout:
    """Read a sharded checkpoint's index and check that every shard it names exists."""
    fix = "re-download the checkpoint or re-save it with `mergecli`"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergeCliError(f"{index}: not a readable JSON shard index ({exc}); {fix}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise MergeCliError(f'{index}: has no (or an empty) "weight_map" object; {fix}')
    # Shards must live inside the checkpoint dir, or hashing and copying it would miss them.
    bad = [
        k
        for k, v in weight_map.items()
        if not isinstance(v, str) or not v or Path(v).is_absolute() or ".." in Path(v).parts
    ]
    if bad:
        raise MergeCliError(
            f"{index}: weight_map entry {bad[0]!r} does not name a file inside {d}; {fix}"
        )
    files = []
    for name in sorted(set(weight_map.values())):
        shard = d / name
        if not shard.is_file():
            raise MergeCliError(
                f"{shard}: shard named in {index.name} is missing; "
                "copy the complete checkpoint directory"
            )
        files.append(shard)
    return Layout(root=d, files=files, index=index, weight_map=dict(weight_map))


def resolve_checkpoint_files(path: str | Path) -> list[Path]:
    """Return the safetensors files that make up the checkpoint at ``path`` (file or directory)."""
    return checkpoint_layout(path).files


def _unreadable(path: Path, exc: BaseException) -> MergeCliError:
    """Build the one-line error for a corrupt, truncated or non-safetensors file."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return MergeCliError(
        f"{path}: not a readable safetensors file ({reason}); re-download or re-save it"
    )


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of one safetensors file onto the CPU."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            # A safe_open handle is not iterable, so .keys() is required here.
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except MemoryError:
        raise
    # safetensors raises SafetensorError for bad headers and short data, but unknown dtypes and
    # OS-level read failures surface as other types; all of them mean "this file is unusable".
    except Exception as exc:
        raise _unreadable(path, exc) from exc


def load_state_dict(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read all tensors of the checkpoint at ``path`` (all shards) onto ``device``."""
    layout = checkpoint_layout(path)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in layout.files:
        for name, tensor in _read_file(file).items():
            if name in state:
                raise MergeCliError(
                    f"{layout.root}: tensor {name!r} appears in both {origin[name].name} and "
                    f"{file.name}; the checkpoint is inconsistent, re-save it"
                )
            state[name] = tensor
            origin[name] = file
    for name, shard in layout.weight_map.items():
        if name not in state:
            raise MergeCliError(
                f"{layout.index}: lists tensor {name!r} in {shard} but no shard contains it; "
                "re-download or re-save the checkpoint"
            )
    if layout.weight_map:
        # safetensors sorts names within a file; the index keeps the order they were saved in.
        state = {name: state[name] for name in layout.weight_map} | state
    if torch.device(device).type != "cpu":
        state = {name: t.to(device) for name, t in state.items()}
    return state


def read_metadata(path: str | Path) -> dict[str, str]:
    """Return the safetensors ``__metadata__`` of the checkpoint (first shard if sharded)."""
    first = checkpoint_layout(path).files[0]
    try:
        with safe_open(str(first), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except MemoryError:
        raise
    except Exception as exc:
        raise _unreadable(first, exc) from exc


def _file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, streamed so multi-GB shards need no extra memory."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise MergeCliError(f"{path}: cannot read the file ({exc}); check its permissions") from exc
    return digest.hexdigest()


def checkpoint_sha256(path: str | Path) -> str:
    """Fingerprint a checkpoint: sha256 of the file, or for a directory of its manifest.

    A single ``.safetensors`` file hashes to the hex sha256 of its bytes. A directory
    checkpoint hashes to the sha256 of the UTF-8 lines ``f"{relative_name}\\0{file_sha256}\\n"``
    for the index file (if any) and each resolved safetensors file, sorted by relative name
    (POSIX separators), so renaming, adding or changing any of those files changes the hash
    while unrelated files in the directory (configs, READMEs) do not.
    """
    p = Path(path)
    layout = checkpoint_layout(p)
    if not p.is_dir():
        return _file_sha256(layout.files[0])
    members = list(layout.files) + ([layout.index] if layout.index else [])
    lines = sorted((m.relative_to(p).as_posix(), _file_sha256(m)) for m in members)
    digest = hashlib.sha256()
    for name, sha in lines:
        digest.update(f"{name}\0{sha}\n".encode())
    return digest.hexdigest()


def sha256_in_background(paths: Sequence[str | Path]) -> list[Future[str]]:
    """`checkpoint_sha256` of each path, computed in order on one daemon thread.

    Hashing gigabytes takes seconds of one core, and a run needs the digests only for its
    report; hashlib and file reads release the GIL, so the hashing overlaps the run's work.
    An unreadable file's error is raised by that future's ``result()``.
    """
    futures: list[Future[str]] = [Future() for _ in paths]

    def work() -> None:
        for path, future in zip(paths, futures, strict=True):
            future.set_running_or_notify_cancel()
            try:
                future.set_result(checkpoint_sha256(path))
            except BaseException as exc:
                future.set_exception(exc)

    threading.Thread(target=work, name="sha256", daemon=True).start()
    return futures
