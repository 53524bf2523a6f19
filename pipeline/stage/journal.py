"""The per-video journal of a run: one JSON line per finished or failed video, appended after each video's
output was committed, so a resumed run skips exactly what is on disk."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from pipeline.io.atomic import jsonable
from pipeline.stage.keys import JOURNAL_GLOB

log = logging.getLogger("pipeline")


def journal_files(folder: Path) -> list[Path]:
    """Every rank's journal file in a stage folder."""
    return sorted(Path(folder).glob(JOURNAL_GLOB))


def read_records(files: Iterable[Path]) -> tuple[dict[str, dict], dict[str, str]]:
    """(done: video -> record, failed: video -> reason) from journal files; a torn last line is ignored and
    a later success clears an earlier failure."""
    done: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for file in files:
        if not file.exists():
            continue
        for line in file.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            vid = rec.get("video")
            if rec.get("damaged"):  # `pipeline verify` found its output damaged: redo it
                done.pop(vid, None)
                failed[vid] = rec.get("reason", "damaged")
            elif rec.get("ok"):
                done[vid] = rec
                failed.pop(vid, None)
            elif vid not in done:
                failed[vid] = rec.get("reason", "unknown")
    return done, failed


def repair_tail(path: Path) -> int:
    """Cut a torn last line (no final newline: a kill mid-write) off the journal ``path``; returns the bytes
    removed. Appending after it would glue the next record to the torn one and lose both. The torn record's
    video was committed but not journaled: it is redone, as after a kill just before the write."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        end, block = size, 1 << 16
        keep = 0
        while end > 0:  # the last newline, read backwards in blocks
            start = max(0, end - block)
            fh.seek(start)
            at = fh.read(end - start).rfind(b"\n")
            if at >= 0:
                keep = start + at + 1
                break
            end = start
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("%s: removed a torn last line (%d bytes, a kill mid-write); its video is redone", path, size - keep)
    return size - keep


class Journal:
    """Append-only JSON-lines record of finished and failed videos of one run (``journal.jsonl``).

    Each line is written and fsynced after the video's output was committed, so on resume every
    recorded success has its output on disk. A torn last line (a kill mid-write) is ignored when read and cut
    off when the file is opened for append (:func:`repair_tail`), so the next record starts on a line of its own.
    """

    def __init__(self, path: Path, *, read_all_ranks: bool = True):
        self.path = Path(path)
        # Under torchrun each rank appends to its own file; every rank reads them all, so a resumed run
        # skips what any rank finished.
        files = journal_files(self.path.parent) if read_all_ranks else [self.path]
        self.done, self.failed = read_records(files)
        repair_tail(self.path)
        self._fh = open(self.path, "a")

    def is_done(self, video_id: str) -> bool:
        return video_id in self.done

    def _append(self, rec: dict) -> None:
        self._fh.write(json.dumps(jsonable(rec), sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def record_ok(self, video_id: str, **info: Any) -> None:
        rec = {"video": video_id, "ok": True, **info}
        self._append(rec)
        self.done[video_id] = rec
        self.failed.pop(video_id, None)

    def record_failure(self, video_id: str, reason: str) -> None:
        self._append({"video": video_id, "ok": False, "reason": reason})
        self.failed[video_id] = reason
        log.warning("failed: %s: %s", video_id, reason)

    def record_damaged(self, video_id: str, reason: str) -> None:
        """The video's committed output was found damaged (``pipeline verify``): it is redone on the next run."""
        self._append({"video": video_id, "ok": False, "damaged": True, "reason": reason})
        self.done.pop(video_id, None)
        self.failed[video_id] = reason

    def close(self) -> None:
        self._fh.close()
