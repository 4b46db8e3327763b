"""The sha256 fingerprints of checkpoints, computed on a thread of their own. Imports nothing
heavy (no torch): `mergecli run` starts hashing its inputs before torch has loaded."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

from mergecli.errors import MergeCliError
from mergecli.io.layout import checkpoint_layout

_CHUNK = 16 << 20


def _file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, streamed so multi-GB shards need no extra memory. In large
    reads into one buffer: the hashing thread takes the GIL once per chunk, and each time makes
    the main thread wait (a run's import of torch, its merge)."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    try:
        with path.open("rb", buffering=0) as f:
            while count := f.readinto(buffer):
                digest.update(view[:count])
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
    """`checkpoint_sha256` of each path, computed in order on a daemon thread.

    Hashing gigabytes takes seconds of one core, and a run needs the digests only for its
    report; hashlib and file reads release the GIL, so the hashing overlaps the run's work.
    A digest that `prefetch_sha256` started for files that have not changed since is taken
    over. An unreadable file's error is raised by that future's ``result()``.
    """
    futures: list[Future[str] | None] = []
    for path in paths:
        key = _identity(path)
        with _LOCK:
            futures.append(_PREFETCHED.pop(key, None) if key is not None else None)
    missing = [i for i, future in enumerate(futures) if future is None]
    for i, future in zip(missing, _start([paths[i] for i in missing]), strict=True):
        futures[i] = future
    return futures  # type: ignore[return-value]


def prefetch_sha256(paths: Sequence[str | Path]) -> None:
    """Start hashing ``paths`` before the run knows it needs them (`mergecli run` does, while
    torch loads); a path that cannot be read is left to the run's own checks to report."""
    keyed = [(path, key) for path in paths if (key := _identity(path)) is not None]
    with _LOCK:
        keyed = [(path, key) for path, key in keyed if key not in _PREFETCHED]
    futures = _start([path for path, _ in keyed])
    with _LOCK:
        for (_, key), future in zip(keyed, futures, strict=True):
            _PREFETCHED[key] = future


# Digests prefetched and not yet taken over, by what they depend on (`_identity`).
_PREFETCHED: dict[tuple, Future[str]] = {}
_LOCK = threading.Lock()


def _identity(path: str | Path) -> tuple | None:
    """What the digest of ``path`` depends on: the path, and each member file's identity and
    change stamps (rewritten, replaced or touched, a file has others: ctime changes with any
    write); None where the checkpoint cannot be resolved."""
    try:
        p = Path(path)
        layout = checkpoint_layout(p)
        members = list(layout.files) + ([layout.index] if layout.index else [])
        stamps = []
        for member in members:
            stat = os.stat(member)
            stamps.append((str(member), stat.st_dev, stat.st_ino, stat.st_size,
                           stat.st_mtime_ns, stat.st_ctime_ns))  # fmt: skip
        return (str(p.absolute()), p.is_dir(), tuple(stamps))
    except (MergeCliError, OSError):
        return None


def _start(paths: Sequence[str | Path]) -> list[Future[str]]:
    """Hash ``paths`` in order on one daemon thread; a future per path."""
    futures: list[Future[str]] = [Future() for _ in paths]
    if not paths:
        return futures

    def work() -> None:
        for path, future in zip(paths, futures, strict=True):
            future.set_running_or_notify_cancel()
            try:
                future.set_result(checkpoint_sha256(path))
            except BaseException as exc:
                future.set_exception(exc)

    threading.Thread(target=work, name="sha256", daemon=True).start()
    return futures
