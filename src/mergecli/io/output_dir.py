"""The output directory of a run: locked, never over an input, its file set swapped in whole.

A run writes its files into a staging directory beside the output (``.NAME.staging-HOST-PID``)
and, when every file is complete and on disk, exchanges the two directories in one rename
(``renameat2(RENAME_EXCHANGE)``): a reader, or a kill at any moment, sees either the complete
old set or the complete new set. What the tool wrote is listed in a manifest, so that a later
run replaces only its own files; files it did not write are refused unless ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

from mergecli import __version__
from mergecli.errors import MergeCliError
from mergecli.io.atomic import write_text_atomic
from mergecli.io.writer import fsync_dir, write_error

MANIFEST = ".mergecli-manifest.json"
LOCK = ".mergecli.lock"
STATE = ".state"  # resumable fit state: lives in the output dir until the run finishes
# Temporary files of this tool (``.NAME.tmp-PID``, ``.shard-K.tmp-PID``, from this version and
# earlier ones); they carry the PID of the process that wrote them.
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>staging|old)-(?P<host>.+)-(?P<pid>\d+)$")
HOST = socket.gethostname().replace("/", "_")


class OutputDir:
    """One run's hold on its output directory, from the checks before any work to the swap."""

    def __init__(self, path: Path, inputs: Iterable[Path] = (), overwrite: bool = False) -> None:
        self.shown = Path(path)  # as the user wrote it, for messages
        self.path = Path(os.path.realpath(path))
        self.inputs = list(inputs)
        self.overwrite = overwrite
        self.created = False
        self._lock: int | None = None
        self._staging: Path | None = None

    # -- before any work --------------------------------------------------------------------
    def open(self) -> None:
        """Refuse unsafe outputs, take the lock, recover from dead runs; make the directory."""
        self._refuse_unsafe_location()
        self._refuse_inputs_inside()
        self._recover_dead_siblings()
        existed = self.path.is_dir()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.shown, exc) from None
        self.created = not existed
        self._take_lock()
        self._remove_dead_temporaries()
        if not self.overwrite:
            self._refuse_foreign_files()

    def lock_in_place(self) -> None:
        """Lock an existing output directory whose files are rewritten in place (`report`)."""
        self._take_lock()

    def _refuse_unsafe_location(self) -> None:
        if self.path.parent == self.path:
            raise MergeCliError(f"{self.shown}: a filesystem root cannot be an output.dir")
        if _inside(Path.cwd().resolve(), self.path):
            raise MergeCliError(
                f"{self.shown}: the output directory contains the current directory, and a run "
                "replaces its output directory whole; choose a new or dedicated output.dir"
            )

    def _refuse_inputs_inside(self) -> None:
        for given in self.inputs:
            if _inside(Path(os.path.realpath(given)), self.path):
                raise MergeCliError(
                    f"{given}: this input is inside the output directory {self.shown}, which "
                    "the run replaces; choose another output.dir (nothing was written)"
                )

    def _take_lock(self) -> None:
        """An exclusive lock on the directory for the whole run; a second run refuses."""
        path = self.path / LOCK
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise write_error(self.shown, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise MergeCliError(
                    f"{self.shown}: another mergecli run (PID {holder}) is writing this output "
                    "directory; wait for it to finish or choose another output.dir"
                ) from None
            # The holder before us may have removed the file after we opened it: lock the
            # file that is there now, not an orphan.
            if _same_file(fd, path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}@{HOST}\n".encode(), 0)
        self._lock = fd

    def _refuse_foreign_files(self) -> None:
        owned = _manifest_files(self.path)
        foreign = [
            name for name in _files_under(self.path) if name not in owned and not _internal(name)
        ]
        if foreign:
            shown = ", ".join(foreign[:5]) + (
                f" and {len(foreign) - 5} more" if foreign[5:] else ""
            )
            raise MergeCliError(
                f"{self.shown}: holds files mergecli did not write ({shown}); choose a new or "
                "empty output.dir, or pass --overwrite to replace the directory with this run's "
                "files"
            )

    def _remove_dead_temporaries(self) -> None:
        """Temporary files of killed runs (in the directory and its fit state) go."""
        for folder in (self.path, self.path / STATE):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                match = _TEMPORARY.match(entry.name)
                if match and entry.is_file() and not _alive(int(match.group(1))):
                    entry.unlink(missing_ok=True)

    def _recover_dead_siblings(self) -> None:
        """A run killed during the swap left its directories beside ours: put back the old set
        where it was missing, and remove what dead runs of this host left."""
        parent = self.path.parent
        if not parent.is_dir():
            return
        for entry in sorted(parent.iterdir()):
            match = _SIBLING.match(entry.name)
            if not match or match["name"] != self.path.name or match["host"] != HOST:
                continue
            if _alive(int(match["pid"])):
                continue
            if match["kind"] == "old" and not self.path.exists():
                os.rename(entry, self.path)
            else:
                shutil.rmtree(entry, ignore_errors=True)

    # -- writing ----------------------------------------------------------------------------
    @property
    def staging(self) -> Path:
        """Where this run's files are written until they are published (made on first use)."""
        if self._staging is None:
            staging = self.path.parent / f".{self.path.name}.staging-{HOST}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                staging.mkdir()
            except OSError as exc:
                raise write_error(self.shown, exc) from None
            self._staging = staging
        return self._staging

    def file(self, relative: str) -> Path:
        """The staging path of output file ``relative``, which must stay inside the directory."""
        path = self.staging / relative
        if not _inside(Path(os.path.normpath(path)), self.staging) or Path(relative).is_absolute():
            raise MergeCliError(
                f"{relative}: an output file name must stay inside the output directory "
                f"{self.shown}; rename what produced it"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def final(self, relative: str) -> Path:
        """Where ``relative`` will be once published (for messages)."""
        return self.shown / relative

    def publish(self) -> None:
        """Swap the staged set in as the output directory; the old one and its state go."""
        staging = self.staging
        _write_manifest(staging, _files_under(staging))
        fsync_tree(staging)
        swap(staging, self.path)
        fsync_dir(self.path.parent)
        # The old directory (now at the staging name) held our lock file: the lock is still
        # ours until release, and a new run locks the new directory.
        shutil.rmtree(staging, ignore_errors=True)
        self._staging = None

    def release(self) -> None:
        """Drop the staging directory of an unfinished run, the lock, and a directory this run
        made that holds nothing else."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        if self._lock is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._lock, self.path / LOCK):
                (self.path / LOCK).unlink()
        os.close(self._lock)
        self._lock = None
        if self.created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only if empty: a stopped fit's state stays


def record_files(out_dir: Path, names: Iterable[str]) -> None:
    """Add ``names`` (written in place by `mergecli report`) to the directory's manifest."""
    _write_manifest(out_dir, _manifest_files(out_dir) | set(names))


def _write_manifest(folder: Path, files: Iterable[str]) -> None:
    manifest = {"mergecli_version": __version__, "files": sorted(files)}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _manifest_files(out_dir: Path) -> set[str]:
    """What an earlier run wrote there; a missing or unreadable manifest vouches for nothing."""
    try:
        data = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        return set()
    return {f for f in files if isinstance(f, str)}


def _files_under(folder: Path) -> list[str]:
    """Every non-directory entry below ``folder``, as sorted relative POSIX paths."""
    found = []
    for root, dirs, files in os.walk(folder):
        here = Path(root).relative_to(folder)
        # A symbolic link to a directory is an entry of its own, never followed.
        links = [d for d in dirs if (Path(root) / d).is_symlink()]
        found += [(here / name).as_posix() for name in [*files, *links]]
    return sorted(found)


def _internal(name: str) -> bool:
    top = name.split("/", 1)[0]
    return top in (MANIFEST, LOCK, STATE) or bool(_TEMPORARY.match(Path(name).name))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_tree(folder: Path) -> None:
    """Every file and directory of the staged set on disk before it becomes visible."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def swap(staging: Path, target: Path) -> None:
    """Exchange two directories atomically; where the filesystem cannot, two renames with the
    old set kept under a name the next run recognises (and puts back if the second fails)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        result = renameat2(
            _AT_FDCWD, os.fsencode(staging), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE
        )
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise write_error(target, OSError(code, os.strerror(code)))
    old = target.parent / f".{target.name}.old-{HOST}-{os.getpid()}"
    try:
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except OSError:
            os.rename(old, target)
            raise
        os.rename(old, staging)  # so that the caller removes the old set where it looks
    except OSError as exc:
        raise write_error(target, exc) from None
