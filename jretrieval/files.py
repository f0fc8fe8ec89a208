"""Files that several runs may share: writer locks, atomic writes, moving aside, orphans, modes.

Every cache under a workdir (descriptor stores, recalibrated BN statistics, results) follows one
protocol, so that two runs on one workdir, a kill at any instant or a full disk never leave a
file under its final name that is incomplete, and never delete or rename a file another live
process is writing:

- ``writer_lock(path)``: an exclusive ``flock`` on ``<path>.lock`` held by the one process that
  may create or resume ``path``. A second process blocks until the first releases it (logging
  who holds it: pid, host, since when), then finds the finished file and reuses it. The kernel
  drops the lock when its holder dies, so a killed run never blocks the next one. The lock file
  is removed by its holder while still locked; a waiter that then gets the lock on the removed
  file notices (its inode is no longer the one at the path) and locks again.
- ``atomic_write(path)``: the content is written to a temporary in the same folder
  (``.tmp-<pid>-...``) and renamed over ``path`` with ``os.replace`` only when complete, so a
  reader sees either the old file or the whole new one.
- ``move_aside(path)``: a file found corrupt is renamed ``<path>.corrupt-<UTC time>`` (never
  deleted: the user may want to look at it) and the path is logged.
- ``clean_temporaries(folder)``: temporaries of killed runs (``.tmp-*`` older than a grace
  period and not locked by a live writer) are removed at start.
- ``apply_umask(path)``: files are created with the user's umask (``0o666 & ~umask``), as
  ``open()`` would, rather than the ``0o600`` of ``tempfile.mkstemp``.

Locks are advisory ``flock`` locks: they work between processes on one host and on local
filesystems; on NFS they depend on the server (``flock`` maps to ``fcntl`` locks there).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import socket
import time
from collections.abc import Iterator

from absl import logging

__all__ = [
    "LOCK_SUFFIX",
    "TEMP_PREFIX",
    "apply_umask",
    "atomic_write",
    "clean_temporaries",
    "file_mode",
    "move_aside",
    "writer_lock",
]

LOCK_SUFFIX = ".lock"
TEMP_PREFIX = ".tmp-"
#: a temporary younger than this may belong to a writer that has not locked it yet.
TEMP_GRACE_S = 60.0


def _umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting (briefly) and restoring
    os.umask(mask)
    return mask


def file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open(path, "w")`` would give a new file."""
    return 0o666 & ~_umask()


def apply_umask(path: str | os.PathLike) -> None:
    """Sets ``path``'s mode to ``file_mode()`` (for files created by ``mkstemp``, ``0o600``)."""
    os.chmod(path, file_mode())


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike, *, what: str = "file") -> Iterator[None]:
    """Holds the exclusive right to create or resume ``path`` (see the module docstring).

    Blocks while another process holds it, logging the holder once. Not re-entrant.
    """
    path = os.fspath(path)
    lock = path + LOCK_SUFFIX
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.warning("waiting for %s %s: it is being written by %s", what, path, _holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            here = os.stat(lock)
            mine = os.fstat(fd)
            current = (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the holder removed that lock file as it finished: lock the new one
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # while still locked: a waiter sees the inode change
        os.close(fd)


def temporary_path(path: str | os.PathLike) -> str:
    """A fresh temporary name beside ``path`` (``.tmp-<pid>-<random>-<name>``)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{name}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path to write ``path``'s whole content to; on success it gets the
    user's umask mode and is renamed over ``path``; on any error it is removed."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        if not os.path.exists(tmp):
            raise FileNotFoundError(f"atomic_write({path!r}): nothing was written to {tmp}")
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def move_aside(path: str | os.PathLike, why: str) -> str:
    """Renames a corrupt ``path`` to ``<path>.corrupt-<UTC time>``, logs it, returns the name."""
    path = os.fspath(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{path}.corrupt-{stamp}"
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.corrupt-{stamp}-{n}"
    os.replace(path, target)
    logging.warning("%s is unreadable (%s); moved aside to %s and rebuilding", path, why, target)
    return target


def _locked_by_someone(path: str) -> bool:
    """Whether a live process holds an ``flock`` on ``path`` (HDF5 locks files it writes)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True  # gone or unreadable: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        return err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # also drops our probe lock
    return False


def clean_temporaries(
    folder: str | os.PathLike, *, prefix: str = TEMP_PREFIX, grace_s: float = TEMP_GRACE_S
) -> list[str]:
    """Removes temporaries left in ``folder`` by killed runs; returns the removed paths.

    A ``prefix*`` file is stale when it is older than ``grace_s`` seconds and no live process
    holds a lock on it (a writer that is still running holds one through HDF5).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    now = time.time()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.startswith(prefix) or not os.path.isfile(path):
            continue
        try:
            if now - os.stat(path).st_mtime < grace_s or _locked_by_someone(path):
                continue
            os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    if removed:
        logging.info("removed %d temporaries of interrupted runs: %s", len(removed), removed)
    return removed
