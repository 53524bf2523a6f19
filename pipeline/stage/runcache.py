"""The run cache: every run of a stage key is kept, addressed by its fingerprint (after DVC's run cache).

The current run of a key is where every stage reads it, ``<cache>/<key>/``. Every other run of that key is kept
(finished or partial) in ``<cache>/.runs/<key>/<fingerprint>/``: before a run with another fingerprint starts,
the folder in place is moved there (``os.replace``: atomic, same file system, no copy), and a run whose
fingerprint is kept there is moved back (restored at once when complete and nothing it recorded is missing,
resumed when partial). Nothing is deleted except by :func:`gc` (``pipeline gc --yes``) and ``--force`` (the run
it replaces). All moves happen under the key's lock.

A deletion never leaves a half-deleted run under a run's name: the folder is first renamed (under the key's
lock, atomically) into ``<cache>/.trash/`` and only then removed (:func:`discard`). A deletion killed half-way
leaves only trash, which is never listed nor restored; the next ``pipeline gc --yes`` empties it.
"""
from __future__ import annotations

import datetime as _dt
import errno
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.stage.errors import StageLocked
from pipeline.stage.keys import (DELETING_PREFIX, MANIFEST, RUN_INFO, RUNS_DIR, TRASH_DIR, key_depth, key_parts,
                                 lock_path)
from pipeline.stage.lock import StageLock, lock_holder
from pipeline.stage.manifest import Manifest, peek_manifest, read_run_info

log = logging.getLogger("pipeline")


def runs_root(cache_root: Path, key: str) -> Path:
    return Path(cache_root) / RUNS_DIR / key


def kept_dir(cache_root: Path, key: str, fingerprint: str) -> Path:
    return runs_root(cache_root, key) / fingerprint


def folder_fingerprint(folder: Path) -> str:
    """The fingerprint a stage folder was written for (run.json, else manifest), or '' when unknown."""
    info = read_run_info(folder) or peek_manifest(folder) or {}
    return str(info.get("fingerprint") or "")


def stash(cache_root: Path, key: str) -> Path | None:
    """Move the folder in place of ``key`` (finished or partial) into the run cache; returns where it went.
    A folder of unknown fingerprint (no run.json) is kept as ``unknown-<time>``; when a run with the same
    fingerprint is already kept, the one moved gets a ``.<n>`` suffix (nothing is overwritten)."""
    src = Path(cache_root) / key
    if not src.exists():
        return None
    fp = folder_fingerprint(src) or f"unknown-{time.strftime('%Y%m%dT%H%M%S')}"
    dest = kept_dir(cache_root, key, fp)
    n = 1
    while dest.exists():
        dest = kept_dir(cache_root, key, f"{fp}.{n}")
        n += 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
    return dest


def restore(cache_root: Path, key: str, fingerprint: str, src: Path | None = None) -> bool:
    """Move the kept run ``fingerprint`` of ``key`` (or the kept folder ``src``, one of :func:`kept_copies`) back
    in place (the place must be empty); False if none."""
    src, dest = Path(src) if src else kept_dir(cache_root, key, fingerprint), Path(cache_root) / key
    if not (src / RUN_INFO).exists() and not (src / MANIFEST).exists():
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
    return True


def kept_copies(cache_root: Path, key: str, fingerprint: str) -> list[Path]:
    """The kept folders of run ``fingerprint``: ``<fp>`` and the ``<fp>.<n>`` copies :func:`stash` made when that
    name was taken, whose run.json (or manifest) is of that fingerprint."""
    root = runs_root(cache_root, key)
    if not root.is_dir():
        return []
    pattern = re.compile(re.escape(fingerprint) + r"(\.\d+)?")
    found = [d for d in root.iterdir() if pattern.fullmatch(d.name) and d.is_dir()
             and folder_fingerprint(d) == fingerprint]
    return sorted(found, key=lambda d: int(d.name.rpartition(".")[2]) if d.name != fingerprint else 0)


# ----------------------------------------------------------------------------------------------------------
# Deleting: rename into the trash, then remove
# ----------------------------------------------------------------------------------------------------------

def trash_root(cache_root: Path) -> Path:
    return Path(cache_root) / TRASH_DIR


def move_to_trash(cache_root: Path, folder: Path) -> Path:
    """Rename ``folder`` (a run folder; the caller holds its key's lock) into ``<cache>/.trash/`` under a unique
    name, atomically, so no reader ever sees it half-deleted; where the trash is on another file system, to a
    ``.deleting-`` sibling instead (never listed either). Returns the new path."""
    cache_root, folder = Path(cache_root), Path(folder)
    rel = folder.name
    for base in (cache_root / RUNS_DIR, cache_root):
        if folder.is_relative_to(base):
            rel = folder.relative_to(base).as_posix()
            break
    unique = f"{os.getpid()}-{time.time_ns()}"
    dest = trash_root(cache_root) / f"{rel.replace('/', '+')}.{unique}"  # e.g. decode+<fingerprint>.<pid>-<ns>
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(folder, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        dest = folder.parent / f"{DELETING_PREFIX}{folder.name}.{unique}"
        os.replace(folder, dest)
    return dest


def remove_trash(path: Path) -> bool:
    """Remove one trash folder (another process removing it at once is harmless); False when some of it is left
    (the next ``pipeline gc --yes`` tries again)."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        log.warning("%s: could not remove all of it; `pipeline gc --yes` tries again", path)
        return False
    return True


def discard(cache_root: Path, folder: Path) -> None:
    """Delete a run folder (the caller holds its key's lock): renamed into the trash first, then removed, so a
    kill part-way leaves only trash, never a partial run under the run's name."""
    remove_trash(move_to_trash(cache_root, folder))


def trash_folders(cache_root: Path) -> list[Path]:
    """Every folder left in the trash by a deletion that did not finish (``.trash/*`` and ``.deleting-*``
    folders under ``.runs/``)."""
    out = []
    root = trash_root(cache_root)
    if root.is_dir():
        out += sorted(root.iterdir())
    runs = Path(cache_root) / RUNS_DIR
    if runs.is_dir():
        for dirpath, dirnames, _ in os.walk(runs):  # down to the keys' folders, never into a run's outputs
            out += [Path(dirpath) / d for d in dirnames if d.startswith(DELETING_PREFIX)]
            key = Path(dirpath).relative_to(runs).as_posix()
            dirnames[:] = [] if _key_like(key) else [d for d in dirnames if not d.startswith(".")
                                                      and not _is_run_folder(Path(dirpath) / d)]
    return out


def empty_trash(cache_root: Path) -> list[Path]:
    """Remove every trash folder (:func:`trash_folders`); returns those removed. (``.trash/`` itself stays: another
    process may be renaming a folder into it.)"""
    return [p for p in trash_folders(cache_root) if remove_trash(p)]


# ----------------------------------------------------------------------------------------------------------
# Listing runs
# ----------------------------------------------------------------------------------------------------------

def _is_run_folder(folder: Path) -> bool:
    return (folder / RUN_INFO).exists() or (folder / MANIFEST).exists()


@dataclass
class RunRecord:
    """One run of a stage key: the current one (in place) or a kept one. ``state``: ``complete``, ``partial``,
    ``torn`` (its manifest.json is torn: the run finished, and restoring it rebuilds the manifest from the
    journal) or ``unknown`` (a kept folder whose run.json and manifest are both gone: only ``gc`` can use it)."""

    key: str
    fingerprint: str
    path: Path
    current: bool
    complete: bool
    started: str = ""
    finished: str = ""
    mtime: float = 0.0
    params: dict = field(default_factory=dict)
    size: int = -1  # bytes; -1 until measured
    state: str = ""
    #: The parameters that do not change the output (workers, device), as the run recorded them; None for a
    #: run recorded before they were.
    execution_only: frozenset[str] | None = None

    @property
    def age_seconds(self) -> float:
        return max(0.0, time.time() - self.mtime)


def _record(key: str, folder: Path, current: bool, with_size: bool) -> RunRecord:
    peeked = peek_manifest(folder)
    manifest = peeked or Manifest(folder / MANIFEST, {})
    info = read_run_info(folder) or {}
    when = manifest.finished or info.get("started") or ""
    try:
        mtime = _dt.datetime.fromisoformat(when).timestamp() if when else folder.stat().st_mtime
    except ValueError:
        mtime = folder.stat().st_mtime
    if peeked is None and (folder / MANIFEST).exists():
        state = "torn"
    elif peeked is None and not info:
        state = "unknown"
    else:
        state = "complete" if manifest.complete else "partial"
    rec = RunRecord(key, manifest.fingerprint or info.get("fingerprint") or folder.name, folder, current,
                    manifest.complete, info.get("started", manifest.get("started", "")),
                    manifest.finished, mtime, manifest.params or info.get("params") or {}, state=state)
    recorded = manifest.get("execution_only", info.get("execution_only"))
    rec.execution_only = frozenset(recorded) if recorded is not None else None
    if with_size:
        rec.size = folder_size(folder)
    return rec


def folder_size(folder: Path) -> int:
    """Bytes on disk of every file under ``folder`` (os.scandir, no symlinks followed)."""
    total, stack = 0, [str(folder)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    else:
                        st = e.stat(follow_symlinks=False)
                        total += getattr(st, "st_blocks", 0) * 512 or st.st_size
        except OSError:
            pass
    return total


def kept_runs(cache_root: Path, key: str, *, with_size: bool = False) -> list[RunRecord]:
    """The kept (non-current) runs of ``key``, newest first: every folder of ``.runs/<key>/`` holding run.json or
    a manifest, and (as ``unknown``) one that lost both, so its disk space stays visible to ``gc``. Trash and
    temporary (dot-named) folders are not runs."""
    root = runs_root(cache_root, key)
    if not root.is_dir():
        return []
    unknown_ok = _key_like(key)
    recs = [_record(key, d, False, with_size) for d in root.iterdir()
            if d.is_dir() and not d.name.startswith(".") and (_is_run_folder(d) or unknown_ok)]
    return sorted(recs, key=lambda r: -r.mtime)


def _key_like(rel: str) -> bool:
    """Whether the path ``rel`` (under ``.runs/``) has the shape of a key: the depth of its stage's keys and,
    for a per-scope stage, a scope (``split1-resnet101``) as its second part."""
    parts = rel.split("/")
    if not parts[0] or parts[0].startswith(".") or len(parts) != key_depth(parts[0]):
        return False
    return len(parts) == 1 or key_parts(rel).split is not None


def all_runs(cache_root: Path, key: str, *, with_size: bool = True) -> list[RunRecord]:
    """Every run of ``key``: the current one first (when there is one), then the kept ones, newest first."""
    cur = Path(cache_root) / key
    out = [_record(key, cur, True, with_size)] if (cur / RUN_INFO).exists() or (cur / MANIFEST).exists() else []
    return out + kept_runs(cache_root, key, with_size=with_size)


def keys_with_kept_runs(cache_root: Path) -> list[str]:
    """Every key that has kept runs (a kept run is a folder holding run.json or manifest.json, or one that lost
    both at the depth of its stage's keys: :func:`kept_runs`)."""
    root = Path(cache_root) / RUNS_DIR
    keys = set()
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root).as_posix()
            parent = Path(rel).parent.as_posix()
            if rel != "." and (RUN_INFO in filenames or MANIFEST in filenames or _key_like(parent)):
                keys.add(parent)
                dirnames.clear()  # do not descend into a run's outputs
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # trash and temporary folders
    return sorted(keys)


def param_diff(old: dict, new: dict) -> list[str]:
    """``name old -> new`` for every parameter that differs (added / removed ones included)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if a != b:
            out.append(f"{k} {a} -> {b}")
    return out


def upstream_change(cache_root: Path, up_key: str, old_fp: str, current: Manifest) -> str:
    """Why upstream ``up_key`` differs from the run (``old_fp``) a downstream output read: the parameters
    that differ between that kept run and the current one, else the code version, else the fingerprints."""
    folder = kept_dir(cache_root, up_key, old_fp)
    old = peek_manifest(folder) or read_run_info(folder)  # the same fields: params, version, upstream
    if old:
        old_up = dict(old.get("upstream") or {})
        diff = param_diff(dict(old.get("params") or {}), current.params)
        if old.get("version") != current.version:
            diff.insert(0, f"code version {old.get('version')} -> {current.version}")
        if not diff and old_up != current.upstream:
            diff = [f"its upstream {k} changed" for k in sorted(set(old_up) | set(current.upstream))
                    if old_up.get(k) != current.upstream.get(k)]
        if diff:
            return f"upstream {up_key} changed ({', '.join(diff)})"
    return f"upstream {up_key} changed ({old_fp[:8]} -> {current.fingerprint[:8]})"


# ----------------------------------------------------------------------------------------------------------
# Garbage collection
# ----------------------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '2w', '45s' -> seconds; ValueError naming the accepted forms otherwise."""
    m = _DURATION.match(text or "")
    if not m:
        raise ValueError(f"--older-than {text!r}: expected a number and a unit s, m, h, d or w (e.g. 7d, 12h)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def _matches(key: str, stage: str | None) -> bool:
    return stage is None or key == stage or key.startswith(stage.rstrip("/") + "/")


def gc_candidates(cache_root: Path, *, stage: str | None = None, keep_last: int | None = None,
                  older_than: float | None = None) -> list[RunRecord]:
    """The kept runs :func:`gc` would remove: per key, every kept run except the ``keep_last`` newest, and
    only those older than ``older_than`` seconds. The current run of a key is never a candidate."""
    out = []
    for key in keys_with_kept_runs(cache_root):
        if not _matches(key, stage):
            continue
        kept = kept_runs(cache_root, key, with_size=True)
        for i, rec in enumerate(kept):
            if keep_last is not None and i < keep_last:
                continue
            if older_than is not None and rec.age_seconds < older_than:
                continue
            out.append(rec)
    return out


def gc(cache_root: Path, *, stage: str | None = None, keep_last: int | None = None,
       older_than: float | None = None, yes: bool = False) -> list[RunRecord]:
    """Remove (``yes``) or list (dry run) the kept runs :func:`gc_candidates` selects; ``yes`` also empties the
    trash (:func:`trash_folders`). A key whose lock is held (a run in progress) is refused with StageLocked
    before anything is removed. Each key's runs are moved into the trash while gc holds that key's lock (a stage
    started meanwhile is refused, and never sees a half-deleted run); the trash is then removed without it."""
    cache_root = Path(cache_root)
    cands = gc_candidates(cache_root, stage=stage, keep_last=keep_last, older_than=older_than)
    keys = sorted({c.key for c in cands})
    for key in keys:
        pid = lock_holder(lock_path(cache_root, key))
        if pid is not None:
            raise _gc_refused(cache_root, key, pid)
    if not yes:
        return cands
    removed = []
    try:
        for key in keys:
            try:
                with StageLock(lock_path(cache_root, key), key):
                    # What is kept may have changed before the lock was taken (a run restored or stashed):
                    # decide again under it.
                    still = {c.path for c in gc_candidates(cache_root, stage=key, keep_last=keep_last,
                                                           older_than=older_than) if c.key == key}
                    for c in cands:
                        if c.key == key and c.path in still:
                            move_to_trash(cache_root, c.path)
                            removed.append(c)
                    _prune_empty(cache_root, runs_root(cache_root, key))
            except StageLocked:
                raise _gc_refused(cache_root, key, lock_holder(lock_path(cache_root, key)) or -1) from None
    finally:
        empty_trash(cache_root)  # the runs moved out, and what a killed deletion left
    return removed


def _gc_refused(cache_root: Path, key: str, pid: int) -> StageLocked:
    return StageLocked(f"gc: {key!r} is being run (pid {pid if pid > 0 else '?'}, lock "
                       f"{lock_path(cache_root, key)}); run gc when that run has finished")


def _prune_empty(cache_root: Path, folder: Path) -> None:
    """Remove ``folder`` and its parents up to ``.runs/`` while they are empty."""
    top = Path(cache_root) / RUNS_DIR
    while folder != top and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def human_size(n: int) -> str:
    if n < 0:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def human_age(seconds: float) -> str:
    for unit, s in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= s:
            return f"{seconds / s:.0f}{unit}"
    return f"{seconds:.0f}s"
