"""The exclusive lock of one stage output, ``<cache>/<key>.lock``, and who holds it."""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import os
import platform
import re
from pathlib import Path

from pipeline.stage.errors import CacheReadOnly, StageLocked
from pipeline.stage.keys import lock_path  # noqa: F401  (the lock file's name: the cache layout)

#: The errors of a file that cannot be written: a read-only file system, no permission.
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_FULL = (errno.ENOSPC, errno.EDQUOT)

#: Lock files this process holds (POSIX record locks do not conflict within one process).
_HELD_LOCKS: set[str] = set()


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


class StageLock:
    """Exclusive lock of one stage output.

    A POSIX record lock (``fcntl.lockf``): the kernel drops it when the process dies, so a killed run never
    leaves a stale lock, and unlike ``flock`` it is not inherited by forked children (DataLoader workers),
    which may outlive a killed parent by seconds. POSIX locks do not conflict within one process, so the
    locks this process holds are also kept in ``_HELD_LOCKS``. While held, the file says
    ``pid <N> on <host> since <time>``.
    """

    def __init__(self, path: Path, key: str):
        self.path, self.key, self.fh = Path(path), key, None

    def _refuse(self, holder: str) -> StageLocked:
        return StageLocked(f"the output of {self.key!r} ({self.path.with_suffix('')}) is being written by "
                           f"{holder}; wait for that run to finish (a second run at once is refused)")

    def __enter__(self) -> "StageLock":
        ident = str(self.path.resolve())
        if ident in _HELD_LOCKS:
            raise self._refuse(f"this process (pid {os.getpid()})")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if e.errno in _READ_ONLY:
                raise CacheReadOnly(f"cache is read-only: {self.path} cannot be opened for writing "
                                    f"({e.strerror})") from None
            raise
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise self._refuse(holder) from None
        self.fh = fd
        _HELD_LOCKS.add(ident)
        # Unbuffered writes: at 0 bytes free the holder's line cannot be written, and the lock holds without it
        # (the runner then refuses the run for want of space, with no traceback).
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {platform.node()} since {now()}".encode(), 0)
        except OSError as e:
            if e.errno not in _FULL:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc) -> None:
        _HELD_LOCKS.discard(str(self.path.resolve()))
        try:
            os.ftruncate(self.fh, 0)
        except OSError:
            pass  # the line is only informational; the lock itself is released below
        fcntl.lockf(self.fh, fcntl.LOCK_UN)
        os.close(self.fh)
        self.fh = None


def lock_holder(path: Path) -> int | None:
    """The pid of the process holding the lock file ``path``, or None when nobody holds it."""
    path = Path(path)
    if not path.exists():
        return None
    if str(path.resolve()) in _HELD_LOCKS:
        # Held by this process. (Opening and closing the file here would drop our own POSIX lock.)
        return os.getpid()
    with open(path) as fh:  # read access is enough for a shared (test) lock
        try:
            fcntl.lockf(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            m = re.match(r"pid (\d+)", fh.read())
            return int(m.group(1)) if m else -1
        fcntl.lockf(fh.fileno(), fcntl.LOCK_UN)
    return None
