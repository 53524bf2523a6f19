"""Free disk space: the check before a run writes, the projection while it writes, and the disk-full stop.

* Before work (:func:`require_free`, called by the runner once it has decided to run): the stage's estimate of
  the bytes it still writes (:class:`Space`, given by its plan, counting only the videos not yet journaled, so
  a run resumed after a full disk is not refused for the work already on disk), at least :data:`FLOOR`,
  against ``shutil.disk_usage`` of the cache. extract-features' estimate is exact; decode and extract-flow
  cannot know their output's size before they compress it and project it instead.
* While writing (:class:`SpaceGuard`): after the first few videos, what they took per unit of work (decode:
  per byte of source video; extract-flow: per frame pair) times the work left is compared with the free
  space after every video; the run stops as soon as it cannot fit, with the finished videos kept.
* A full disk anyway (ENOSPC, errno 28, or a quota): the run stops at the first one (:func:`is_disk_full`,
  :func:`disk_full_error`) instead of recording one per-video failure per remaining video.

Every message names the path, the space needed and what frees space (``pipeline gc``). Where the paper and
the tools are silent, the floor and the number of videos before a projection are our choices.
"""
from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Mapping

from pipeline.stage.errors import DiskFull
from pipeline.stage.runcache import folder_size, human_size as human

#: Bytes every run needs at least (run.json, the journal, the log, the manifest, small outputs and plots).
FLOOR = 16 << 20
#: Videos measured before :class:`SpaceGuard` projects the rest.
MIN_SAMPLES = 2
GC_HINT = ("free space there (`pipeline gc` lists the runs kept in the run cache, `pipeline gc --yes` removes "
           "them) or use another --cache-dir")
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the file system of ``path`` (its nearest existing folder)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def path_size(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a folder (a Zarr container); 0 when absent."""
    path = Path(path)
    if path.is_dir():
        return folder_size(path)
    try:
        st = path.stat()
    except OSError:
        return 0
    return getattr(st, "st_blocks", 0) * 512 or st.st_size


@dataclass(frozen=True)
class Space:
    """A stage's estimate of the bytes a run writes: ``per_video`` (video id -> bytes) plus ``fixed`` (e.g. a
    consolidated store written at the end); ``what`` says what the bytes are, for the message."""

    what: str
    per_video: Mapping[str, int] = field(default_factory=dict)
    fixed: int = 0

    def remaining(self, done: Collection[str] = ()) -> int:
        """The bytes still to write when the videos ``done`` are journaled (their output is on disk)."""
        done = set(done)
        return int(self.fixed + sum(b for v, b in self.per_video.items() if v not in done))


def require_free(root: Path, need: int, what: str) -> None:
    """DiskFull (naming ``root``, the bytes needed and ``pipeline gc``) when fewer than ``max(need, FLOOR)``
    bytes are free there."""
    need = max(int(need), FLOOR)
    free = free_bytes(root)
    if free < need:
        raise DiskFull(f"not enough disk space in {root}: {what} needs about {human(need)}, {human(free)} free; "
                       f"{GC_HINT}")


def is_disk_full(e: BaseException | None) -> bool:
    """Whether ``e`` (or an exception it was raised from) is a full disk or quota: errno ENOSPC / EDQUOT, or a
    library's message carrying it (HDF5 reports ``errno = 28`` in its text)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        text = str(e)
        if "No space left on device" in text or "errno = 28," in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(e: BaseException, root: Path, key: str, needed: int | None = None) -> DiskFull:
    """The DiskFull that stops a run at its first ENOSPC: the path being written, the free space and the space
    the rest of the run needs (when estimated), and what frees space."""
    path = getattr(e, "filename", None) or Path(root) / key
    free = free_bytes(root)
    more = f"; the rest of the run needs about {human(needed)}" if needed else ""
    return DiskFull(f"disk full (errno {errno.ENOSPC}, no space left on device) writing {path}: {human(free)} "
                    f"free in {root}{more}; {GC_HINT}, then re-run {key.split('/')[0]}: what finished is kept "
                    "and the run resumes")


class SpaceGuard:
    """Projects the bytes a run still writes from what its finished videos took, and stops it (DiskFull)
    as soon as they exceed the free space.

    ``units`` is the work left, in a unit whose cost is roughly proportional to the bytes written (decode:
    source bytes; extract-flow: frame pairs), ``videos`` the videos left; :meth:`add` is called after each
    committed video with the bytes its output takes and its units. The projection starts after
    :data:`MIN_SAMPLES` videos.
    """

    def __init__(self, root: Path, key: str, units: float, videos: int, noun: str = "output"):
        self.root, self.key, self.left, self.videos, self.noun = Path(root), key, float(units), videos, noun
        self.bytes_done, self.units_done, self.samples = 0, 0.0, 0

    def needed(self) -> int | None:
        """The projected bytes of the work left (None before anything was measured)."""
        if self.units_done <= 0:
            return None
        return int(self.bytes_done / self.units_done * max(self.left, 0.0))

    def add(self, nbytes: int, units: float = 1.0) -> None:
        self.bytes_done += int(nbytes)
        self.units_done += units
        self.left -= units
        self.samples += 1
        self.videos -= 1
        if self.samples < MIN_SAMPLES or self.left <= 0:
            return
        need = self.needed() or 0
        free = free_bytes(self.root)
        if need > free:
            raise DiskFull(f"not enough disk space in {self.root} for the rest of {self.key}: the {self.noun} of the "
                           f"{self.videos} video(s) left need about {human(need)} (the {self.samples} written this "
                           f"run took {human(self.bytes_done)}), {human(free)} free; {GC_HINT}, then re-run "
                           f"{self.key.split('/')[0]}: the finished videos are kept and the run resumes")
