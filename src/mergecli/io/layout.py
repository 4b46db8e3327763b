"""Where a checkpoint's bytes live: a safetensors file, a directory with one, or a sharded
directory with its index. Imports nothing heavy (no torch), so that a run can find its inputs
(and start hashing them) while torch loads."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mergecli.errors import MergeCliError

INDEX_NAME = "model.safetensors.index.json"
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
