"""Atomic output: every file is written under a hidden name beside its destination, then renamed into place.

A reader never sees a half-written model, statistics file or report, and an interrupted write leaves
nothing behind: the converter's output, its JSON report, and the ComfyUI nodes' saves all go through
`StagedFile`. A process killed outright (SIGKILL, the OOM killer) cannot clean up, so the hidden name
says which process owns it (`.<name>.<host>-<pid>.<random>.partial`): the next write of that name
removes the ones whose process is gone, and says so. An interrupt (Ctrl-C, SIGTERM) can land between
a file's creation and the moment its owner takes charge of it; every file this process has created and
not yet placed or removed is listed, so the interrupt's handler removes them all (`discard_unplaced`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_WRITE_BLOCK = 1 << 26
_MAX_HINT = 64  # characters of the final name kept in the hidden one: a long name cannot overflow the limit
_SUFFIX = ".partial"
# This machine, in the hidden names: a process id means nothing on another machine sharing the folder.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_UNPLACED: set[Path] = set()  # hidden files this process created and has neither placed nor removed


class StagedFile:
    """A hidden temporary file in `folder` (created with it as needed), removed unless it is placed.

    Write it (`write_at`), then `place` it under its final name: the rename is atomic because the
    file already lies in the destination's folder. Leaving the context without placing it deletes it.
    OSError is left to the caller, which knows what to tell the user.
    """

    def __init__(self, folder: str | os.PathLike, hint: str = ""):
        self.folder = Path(folder)
        self.created_folders = _make_folders(self.folder)  # removed again (when empty) unless the file is placed
        self.fd = -1
        self.path: Path | None = None
        try:
            remove_stale(self.folder, hint)
            self.path, self.fd = _created(self.folder, f".{hint[:_MAX_HINT]}.{_HOST}-{os.getpid()}.")
        except BaseException:
            _remove_empty(self.created_folders)
            raise

    @classmethod
    def copy_of(cls, source: Path, folder: str | os.PathLike) -> StagedFile:
        """A complete staged copy of `source`: a hard link where the folder is on its disk (no copy), else a
        synced copy."""
        staged = cls(folder, source.name)
        try:
            staged._close()
            staged.path.unlink()
            try:
                os.link(source, staged.path)
            except OSError:
                shutil.copyfile(source, staged.path)
                with open(staged.path, "rb+") as fh:
                    os.fsync(fh.fileno())
        except BaseException:
            staged.discard()
            raise
        return staged

    def write_at(self, data: bytes | memoryview, position: int) -> None:
        """Write all of `data` at byte `position` (in blocks: one huge write can fail on some systems)."""
        view = memoryview(data).cast("B")
        while view.nbytes:
            written = os.pwrite(self.fd, view[:_WRITE_BLOCK], position)
            view = view[written:]
            position += written

    def place(self, target: Path, overwrite: bool = False) -> Path:
        """Give the file its final name; FileExistsError if `target` exists and not `overwrite`."""
        self._close()
        if overwrite:
            os.replace(self.path, target)
        else:
            _rename_no_clobber(self.path, target)
        _UNPLACED.discard(self.path)
        self.path = None
        self.created_folders = []  # they hold the file now
        return target

    def place_first_free(self, targets: Iterable[Path]) -> Path | None:
        """Place the file at the first of `targets` that does not exist yet (never replacing one); None if all do."""
        for target in targets:
            try:
                return self.place(target)
            except FileExistsError:
                continue
        return None

    def discard(self) -> None:
        """Remove the file, and the folders created for it that are still empty."""
        self._close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            _UNPLACED.discard(self.path)
            self.path = None
        _remove_empty(self.created_folders)
        self.created_folders = []

    def _close(self) -> None:
        """Flush to disk before the rename, so a crash cannot leave a complete name over incomplete data."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def _created(folder: Path, prefix: str) -> tuple[Path, int]:
    """A new empty file `<prefix><random>.partial` in `folder` and its descriptor, listed as unplaced before
    it exists. Its permissions are the umask's, as for any file the user writes (it becomes the output)."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(4)}{_SUFFIX}"
        _UNPLACED.add(path)
        try:
            return path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            _UNPLACED.discard(path)
        except BaseException:
            path.unlink(missing_ok=True)
            _UNPLACED.discard(path)
            raise


def discard_unplaced() -> None:
    """Remove every hidden file this process created and has not placed: what an interrupt leaves, wherever
    it landed. Only for a process that is stopping its writes (the command line on Ctrl-C or SIGTERM)."""
    for path in list(_UNPLACED):
        path.unlink(missing_ok=True)
        _UNPLACED.discard(path)


def remove_stale(folder: Path, hint: str) -> None:
    """Remove the hidden files of `hint` in `folder` left by processes of this machine that are gone; one warning.

    Only regular files of this user whose whole name is this module's pattern for `hint` are touched;
    those of a live process, of another machine, or in any other form stay.
    """
    pattern = re.compile(
        rf"\.{re.escape(hint[:_MAX_HINT])}\.(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)\.[a-z0-9_]+{re.escape(_SUFFIX)}"
    )
    removed, freed = 0, 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found is None or found["host"] != _HOST or _process_exists(int(found["pid"])):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed += 1
        freed += info.st_blocks * 512  # what it held on disk (it was sized in full up front, sparsely)
    if removed:
        log.warning(
            "removed %d stale partial file%s of %s in %s, left by an interrupted run (%s freed)",
            removed,
            "s" if removed > 1 else "",
            hint,
            folder,
            human_bytes(freed),
        )


def _process_exists(pid: int) -> bool:
    """Whether a process of this id runs here (True where that cannot be told: nothing is removed then)."""
    if pid <= 0 or os.name != "posix":  # elsewhere os.kill(pid, 0) would not be a harmless probe
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def free_bytes(folder: Path) -> int:
    """Free space for this user where `folder` is (or will be created: its nearest existing parent)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def human_bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def _make_folders(folder: Path) -> list[Path]:
    """Create `folder` with its missing parents; returns the ones this call created, deepest first."""
    missing = []
    current = folder
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    created: list[Path] = []
    try:
        for path in reversed(missing):  # outermost first
            try:
                path.mkdir()
            except FileExistsError:  # made meanwhile by someone else: not ours to remove
                continue
            created.insert(0, path)
        folder.mkdir(parents=True, exist_ok=True)  # raises what stands in the way (a file, no permission)
    except BaseException:
        _remove_empty(created)
        raise
    return created


def _remove_empty(folders: Iterable[Path]) -> None:
    """Remove each folder (deepest first) if it is empty; a folder something else was put in stays."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty: nor are the folders above it


def write_atomically(target: str | os.PathLike, data: bytes) -> Path:
    """A small file written whole (replacing any file of that name), complete or not at all."""
    target = Path(target)
    with StagedFile(target.parent, target.name) as staged:
        staged.write_at(data, 0)
        return staged.place(target, overwrite=True)


def _rename_no_clobber(source: Path, target: Path) -> None:
    """Move source to target, raising FileExistsError rather than replacing an existing target."""
    try:
        os.link(source, target)  # atomic and refuses an existing name
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links
        if target.exists():
            raise FileExistsError(target) from None
        os.replace(source, target)
        return
    os.unlink(source)
