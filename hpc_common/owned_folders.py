"""Folders owned by one live process on a shared filesystem, and taking over those whose owner died.

The agent's in-flight journal (`<root>/<agent id>/`) and the spool's claims
(`claimed/<agent id>/`) work the same way: the owner holds an exclusive flock on `<folder>/lock`
for its whole life, and the kernel drops it however the process dies (kill -9, OOM, walltime).
Anyone who can take that lock knows the owner is dead and may take the folder's contents over.
flock (not filelock's lock files) because only a kernel lock dies with its holder; it works
across nodes on NFSv4 and on Lustre mounted with -o flock. Every write is temporary file, fsync,
rename, fsync of the folder, so a reader sees a whole file or none.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from typing import Callable, Iterator, Optional

log = logging.getLogger("hpc_common.owned_folders")
LOCK_NAME = "lock"


class FolderLocked(BlockingIOError):
    """Another live process holds the folder's lock (an OSError, as a failed flock is)."""


def fsync_dir(path: str) -> None:
    """Make a rename or unlink in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def try_lock(path: str, create: bool = True) -> Optional[int]:
    """flock `path` without waiting: the open fd (keep it open to hold the lock), or None when held.

    Raises OSError for anything else (missing file with create=False, permissions, no flock support).
    """
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def write_atomic(path: str, data: bytes, tmp: Optional[str] = None) -> None:
    """Write `data` to `path` durably: temporary file (`tmp`, default `<path>.tmp-<pid>`), fsync,
    rename, fsync of the folder."""
    tmp = tmp or f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))


class OwnedFolder:
    """`<root>/<owner>/`, locked by this process for as long as it is open."""

    def __init__(self, root: str, owner: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.dir = os.path.join(self.root, owner)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def open(self) -> None:
        """Create the folder and take its lock; FolderLocked when another live process holds it."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        fd = try_lock(os.path.join(self.dir, LOCK_NAME))
        if fd is None:
            raise FolderLocked(errno.EWOULDBLOCK, "locked by another live process", self.dir)
        self._fd = fd

    def close(self, remove: bool = True) -> None:
        """Release the lock; with remove, also delete the lock file and the folder if it is empty."""
        if self._fd is None:
            return
        if remove:
            release_folder(self.dir)
        os.close(self._fd)
        self._fd = None


def release_folder(folder: str) -> None:
    """Remove a folder's lock file and the folder itself (kept when anything else is left in it)."""
    try:
        os.unlink(os.path.join(folder, LOCK_NAME))
        os.rmdir(folder)
    except OSError:
        pass


def dead_owner_folders(root: str, own_dir: Optional[str], min_age: float) -> Iterator[tuple[str, int]]:
    """Folders under root whose owner is dead, each yielded with its lock held by the caller.

    The caller closes the fd when done. A folder without a lock file belongs to an owner still
    setting it up, or to one that died before taking its lock: it is taken only once its mtime is
    older than min_age seconds. own_dir (this process's own folder) is never yielded.
    """
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return
    for name in names:
        folder = os.path.join(root, name)
        if folder == own_dir or not os.path.isdir(folder):
            continue
        lock_path = os.path.join(folder, LOCK_NAME)
        try:
            if not os.path.exists(lock_path) and time.time() - os.stat(folder).st_mtime <= min_age:
                continue
            fd = try_lock(lock_path)
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):  # gone: a recoverer just finished it
                log.warning("cannot lock %s: %s", folder, exc.strerror)
            continue
        if fd is not None:
            yield folder, fd


def take_over_dead_owners(root: str, own_dir: Optional[str], min_age: float, take_over: Callable[[str], None],
                          what: str) -> None:
    """Call take_over(folder) for each folder whose owner died, holding its lock meanwhile.

    An OSError stops that folder only (logged as "<what> <folder> stopped"); the lock is always released.
    """
    for folder, fd in dead_owner_folders(root, own_dir, min_age):
        try:
            take_over(folder)
        except OSError as exc:
            log.warning("%s %s stopped: %s", what, folder, exc)
        finally:
            os.close(fd)
