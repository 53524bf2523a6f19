"""The run cache: every run of a stage key is kept, addressed by its fingerprint (after DVC's run cache).

The current run of a key is where every stage reads it, ``<cache>/<key>/``. Every other run of that key is kept
(finished or partial) in ``<cache>/.runs/<key>/<fingerprint>/``: before a run with another fingerprint starts,
the folder in place is moved there (``os.replace``: atomic, same file system, no copy), and a run whose
fingerprint is kept there is moved back (restored at once when complete, resumed when partial). Nothing is
deleted except by :func:`gc` (``pipeline gc --yes``). All moves happen under the key's lock.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.stage.errors import StageLocked
from pipeline.stage.keys import MANIFEST, RUN_INFO, RUNS_DIR, lock_path
from pipeline.stage.lock import lock_holder
from pipeline.stage.manifest import Manifest, peek_manifest, read_run_info


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


def restore(cache_root: Path, key: str, fingerprint: str) -> bool:
    """Move the kept run ``fingerprint`` of ``key`` back in place (the place must be empty); False if none."""
    src, dest = kept_dir(cache_root, key, fingerprint), Path(cache_root) / key
    if not (src / RUN_INFO).exists() and not (src / MANIFEST).exists():
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
    return True


# ----------------------------------------------------------------------------------------------------------
# Listing runs
# ----------------------------------------------------------------------------------------------------------

@dataclass
class RunRecord:
    """One run of a stage key: the current one (in place) or a kept one."""

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

    @property
    def age_seconds(self) -> float:
        return max(0.0, time.time() - self.mtime)


def _record(key: str, folder: Path, current: bool, with_size: bool) -> RunRecord:
    manifest = peek_manifest(folder) or Manifest(folder / MANIFEST, {})
    info = read_run_info(folder) or {}
    when = manifest.finished or info.get("started") or ""
    try:
        mtime = _dt.datetime.fromisoformat(when).timestamp() if when else folder.stat().st_mtime
    except ValueError:
        mtime = folder.stat().st_mtime
    rec = RunRecord(key, manifest.fingerprint or info.get("fingerprint") or folder.name, folder, current,
                    manifest.complete, info.get("started", manifest.get("started", "")),
                    manifest.finished, mtime, manifest.params or info.get("params") or {})
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
    """The kept (non-current) runs of ``key``, newest first."""
    root = runs_root(cache_root, key)
    if not root.is_dir():
        return []
    recs = [_record(key, d, False, with_size) for d in root.iterdir()
            if d.is_dir() and ((d / RUN_INFO).exists() or (d / MANIFEST).exists())]
    return sorted(recs, key=lambda r: -r.mtime)


def all_runs(cache_root: Path, key: str, *, with_size: bool = True) -> list[RunRecord]:
    """Every run of ``key``: the current one first (when there is one), then the kept ones, newest first."""
    cur = Path(cache_root) / key
    out = [_record(key, cur, True, with_size)] if (cur / RUN_INFO).exists() or (cur / MANIFEST).exists() else []
    return out + kept_runs(cache_root, key, with_size=with_size)


def keys_with_kept_runs(cache_root: Path) -> list[str]:
    """Every key that has kept runs (a kept run is a folder holding run.json or manifest.json)."""
    root = Path(cache_root) / RUNS_DIR
    keys = set()
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            if RUN_INFO in filenames or MANIFEST in filenames:
                keys.add(Path(dirpath).parent.relative_to(root).as_posix())
                dirnames.clear()  # do not descend into a run's outputs
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
    """Remove (``yes``) or list (dry run) the kept runs :func:`gc_candidates` selects. A key whose lock is
    held (a run in progress) is refused with StageLocked before anything is removed."""
    cands = gc_candidates(cache_root, stage=stage, keep_last=keep_last, older_than=older_than)
    for key in sorted({c.key for c in cands}):
        pid = lock_holder(lock_path(cache_root, key))
        if pid is not None:
            raise StageLocked(f"gc: {key!r} is being run (pid {pid if pid > 0 else '?'}, lock "
                              f"{lock_path(cache_root, key)}); run gc when that run has finished")
    if yes:
        for c in cands:
            shutil.rmtree(c.path)
            parent = c.path.parent
            while parent != Path(cache_root) / RUNS_DIR and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    return cands


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
