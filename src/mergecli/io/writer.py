"""The one writer of model files: planned shards streamed to temporary names, fsync'd, renamed.

Every output tensor's name, shape and dtype are known before any is written (from the inputs'
headers, or from the tensors themselves), so each shard's safetensors header is written first
and each tensor appended the moment it is ready: nothing is buffered beyond the one tensor a
worker thread is writing while the caller computes the next (a write holds no GIL, so a streamed
merge's writing and computing overlap on two cores). Each shard is also synced to disk as it
grows, on a thread of its own, so that the disk's work overlaps the computing. Shards carry
temporary names (``.shard-K.tmp-PID``) until ``close`` fsyncs them, renames them
(``model-0000K-of-0000N.safetensors``, or ``model.safetensors`` for one), writes the index last
and only then removes the files of an earlier save's other layout.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from mergecli.errors import MergeCliError
from mergecli.io.checkpoint import INDEX_NAME
from mergecli.io.safetensors_format import safetensors_header

SINGLE_NAME = "model.safetensors"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

Plan = list[tuple[str, tuple[int, ...], torch.dtype]]

# Every this many bytes the worker has a thread of its own fdatasync the growing shard, so that
# the disk writes while the caller computes and the fsync before the rename finds little left (a
# 1 GB shard left to the close took 1.2-1.4 s there on the 2-core VM of bench/RESULTS.md). On a
# thread of its own because the sync waits for the disk, and the worker must not: synced by the
# worker itself, 1 GB written without computing between took 2.8 s instead of 1.7 s.
_SYNC_EVERY = 64 << 20
# fdatasync where the platform has it (not macOS): a file's size, the one metadata its data
# needs, is synced with it.
_datasync = getattr(os, "fdatasync", os.fsync)


def shard_name(index: int, count: int) -> str:
    """HF shard file name for 1-based ``index`` of ``count`` shards."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def write_error(out_dir: Path, exc: BaseException) -> MergeCliError:
    """The one-line error for an output directory that cannot be created or written."""
    reason = getattr(exc, "strerror", None) or " ".join(str(exc).split()) or type(exc).__name__
    return MergeCliError(
        f"{out_dir}: cannot write the output directory ({reason}); free some space, fix its "
        "permissions or choose another output.dir"
    )


def fsync_dir(path: Path) -> None:
    """Persist renames in ``path``; best effort, since some platforms cannot fsync a directory."""
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


class ShardWriter:
    """Streams tensors, in plan order, into shards of at most ``shard_size`` bytes."""

    def __init__(
        self, out_dir: Path, plan: Plan, metadata: dict[str, str], shard_size: int | None
    ) -> None:
        self.out_dir = Path(out_dir)
        # total_size must describe this save even if the caller's metadata has the key.
        self.metadata = {str(k): str(v) for k, v in metadata.items() if k != "total_size"}
        self.shards: list[list[tuple[str, torch.Tensor]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            spec = torch.empty(shape, dtype=dtype, device="meta")  # shape and dtype, no memory
            nbytes = spec.numel() * spec.element_size()
            # An oversized tensor still gets written: alone in its own shard.
            if shard_size is not None and self.shards[-1] and size + nbytes > shard_size:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, spec))
            size += nbytes
        self.total_size = sum(
            s.numel() * s.element_size() for shard in self.shards for _, s in shard
        )
        self._order = [
            (i, name, spec) for i, shard in enumerate(self.shards) for name, spec in shard
        ]
        self._next = 0
        self._temps: list[Path] = []
        self._headers: list[bytes] = []
        self._handle = None
        self._unflushed = 0
        self._sync: threading.Thread | None = None
        self._sync_failure: OSError | None = None
        # At most one tensor waits while the worker writes another.
        self._pending: queue.Queue[tuple[int, torch.Tensor] | None] = queue.Queue(maxsize=1)
        self._worker: threading.Thread | None = None
        self._failure: BaseException | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` for writing; a failed earlier write is raised here (files removed)."""
        shard, expected, spec = self._order[self._next]
        if name != expected or tuple(tensor.shape) != tuple(spec.shape):
            raise RuntimeError(f"writer expected {expected} {tuple(spec.shape)}, got {name}")
        if self._failure is not None:
            self.abort()
            raise self._failure
        data = tensor.detach().to("cpu", spec.dtype).contiguous().reshape(-1)
        if self._worker is None:
            self._worker = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
            self._worker.start()
        self._pending.put((shard, data))
        self._next += 1

    def _drain(self) -> None:
        """The worker: write queued tensors in order; after a failure, drop the rest."""
        while (item := self._pending.get()) is not None:
            if self._failure is None:
                try:
                    self._write(*item)
                except BaseException as exc:  # raised to the caller by its next add or close
                    self._failure = exc

    def _write(self, shard: int, data: torch.Tensor) -> None:
        try:
            if shard == len(self._temps):
                self._open(shard)
            if data.numel():
                self._handle.write(memoryview(data.view(torch.uint8).numpy()))
                self._unflushed += data.numel() * data.element_size()
            if self._unflushed >= _SYNC_EVERY:
                self._sync_in_background()
        except OSError as exc:
            raise write_error(self.out_dir, exc) from None

    def _sync_in_background(self) -> None:
        """Start syncing the open shard, unless a sync still runs (its successor, or the close's
        fsync, takes what this one would have)."""
        if self._sync is not None and self._sync.is_alive():
            return
        self._wait_for_sync()
        self._handle.flush()
        self._unflushed = 0
        fd = self._handle.fileno()

        def sync() -> None:
            try:
                _datasync(fd)
            except OSError as exc:
                self._sync_failure = exc

        self._sync = threading.Thread(target=sync, name="shard-sync", daemon=True)
        self._sync.start()

    def _wait_for_sync(self) -> None:
        """Let the background sync end (before its file is closed); raise what it met."""
        if self._sync is not None:
            self._sync.join()
            self._sync = None
        if self._sync_failure is not None:
            failure, self._sync_failure = self._sync_failure, None
            raise failure

    def _stop_worker(self) -> None:
        """Wait until every queued tensor is written (or dropped after a failure)."""
        if self._worker is not None:
            self._pending.put(None)
            self._worker.join()
            self._worker = None

    def _open(self, shard: int) -> None:
        self._finish_shard()
        tmp = self.out_dir / f".shard-{shard + 1}.tmp-{os.getpid()}"
        self._temps.append(tmp)
        self._handle = open(tmp, "wb")  # noqa: SIM115 - closed by the next shard or close()
        header = safetensors_header(dict(self.shards[shard]), self.metadata)
        self._headers.append(header)
        self._handle.write(header)

    def _finish_shard(self) -> None:
        """Flush the open shard to disk, so that a rename never exposes missing data."""
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        self._unflushed = 0
        try:
            self._wait_for_sync()
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            handle.close()

    def close(self, metadata: Mapping[str, str] | None = None) -> list[Path]:
        """Move every shard (and the index) to its final name once all tensors are in.

        ``metadata`` replaces the metadata given at the start, in every shard's header (which
        was written first) and in the index: it may fill in values that were not known then,
        such as digests computed meanwhile, but must render to a header of the same length.
        Shards are renamed first and the index last; a failure removes this save's files
        (temporary or renamed). Files of an earlier save's other layout go only at the end.
        """
        if self._next != len(self._order):
            raise RuntimeError(f"writer got {self._next} of {len(self._order)} tensors")
        renamed: list[Path] = []
        try:
            self._stop_worker()
            if self._failure is not None:
                raise self._failure
            if not self._temps:
                self._open(0)
            self._finish_shard()
            if metadata is not None:
                self._rewrite_headers(metadata)
            count = len(self._temps)
            names = (
                [SINGLE_NAME] if count == 1 else [shard_name(i + 1, count) for i in range(count)]
            )
            pending = [
                (tmp, self.out_dir / name) for tmp, name in zip(self._temps, names, strict=True)
            ]
            if count > 1:
                pending.append((self._write_index(names), self.out_dir / INDEX_NAME))
            for tmp, final in pending:
                os.replace(tmp, final)
                renamed.append(final)
            fsync_dir(self.out_dir)
            finals = [final for _, final in pending]
            for stale in self._stale(finals):
                stale.unlink(missing_ok=True)
        except BaseException as exc:
            self.abort()
            # A half-renamed set would pair new shards with an old index; remove the new ones.
            for final in renamed:
                with contextlib.suppress(OSError):
                    final.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise write_error(self.out_dir, exc) from exc
            raise
        return finals

    def _rewrite_headers(self, metadata: Mapping[str, str]) -> None:
        """Put ``metadata`` in the written shards' headers, in place (same length), fsync'd."""
        self.metadata = {str(k): str(v) for k, v in metadata.items() if k != "total_size"}
        for shard, (tmp, old) in enumerate(zip(self._temps, self._headers, strict=True)):
            new = safetensors_header(dict(self.shards[shard]), self.metadata)
            if new == old:
                continue
            if len(new) != len(old):
                raise RuntimeError(f"{tmp}: the final header is {len(new)} bytes, not {len(old)}")
            fd = os.open(tmp, os.O_WRONLY)
            try:
                os.pwrite(fd, new, 0)
                os.fsync(fd)
            finally:
                os.close(fd)

    def _write_index(self, names: list[str]) -> Path:
        index = {
            "metadata": {"total_size": self.total_size, **self.metadata},
            "weight_map": {
                n: f for shard, f in zip(self.shards, names, strict=True) for n, _ in shard
            },
        }
        tmp = self.out_dir / f".{INDEX_NAME}.tmp-{os.getpid()}"
        self._temps.append(tmp)
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        return tmp

    def _stale(self, finals: list[Path]) -> list[Path]:
        """Files of an earlier save (either layout) that this save did not overwrite."""
        keep = {f.name for f in finals}
        stale = [
            self.out_dir / name
            for name in (INDEX_NAME, SINGLE_NAME)
            if name not in keep and (self.out_dir / name).is_file()
        ]
        stale += sorted(
            f for f in self.out_dir.iterdir() if _SHARD_RE.match(f.name) and f.name not in keep
        )
        return stale

    def abort(self) -> None:
        """Remove every temporary file written so far (a failed save leaves nothing behind)."""
        self._stop_worker()
        with contextlib.suppress(OSError):
            self._wait_for_sync()  # before its file is closed: a closed fd's number is reused
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None
        for tmp in self._temps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _output_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    # Integer/bool buffers (num_batches_tracked, position ids) must keep their exact values.
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


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
    (returned last), through `ShardWriter`. ``dtype`` casts floating-point tensors only.
    ``metadata`` (keys and values coerced to ``str``) goes into every file's ``__metadata__``
    and into the index's ``metadata`` next to ``total_size``.
    """
    out = Path(out_dir)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    if shard_size is not None and shard_size <= 0:
        raise ValueError(f"shard_size must be a positive number of bytes, got {shard_size}")
    for name, tensor in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state_dict key {name!r} is not a string")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(out, exc) from exc
    plan = [(n, tuple(t.shape), _output_dtype(t, dtype)) for n, t in state_dict.items()]
    writer = ShardWriter(out, plan, dict(metadata or {}), shard_size)
    try:
        for name, tensor in state_dict.items():
            writer.add(name, tensor)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
