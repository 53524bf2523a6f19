"""The stage contract: fingerprints, per-video journals, manifests, locking and status.

A stage (see ``stages/``) declares its name, a version string, a parameter dataclass, the upstream stage
outputs it reads and a ``run`` function. Running it through :func:`run_stage`:

1. loads the upstream manifests (each must be complete) and lets the stage ``plan`` its work, which may
   raise a clear error before anything is written (bad paths, missing split files, ...);
2. computes the fingerprint = sha256 of the stage name, its version, the parameters it reads (fields marked
   ``fingerprint=False`` such as ``workers`` are left out), the upstream fingerprints and the plan's input
   digest; all of it before running (DVC's run-cache rule);
3. takes the stage's lock (a POSIX ``fcntl.lockf`` record lock; a second concurrent run is refused with a clear message, and a
   killed run never leaves a stale lock);
4. if a complete manifest with the same fingerprint exists, does nothing and says so;
5. if earlier partial work has another fingerprint, clears it; otherwise resumes it: the stage asks
   :class:`Journal` which videos are done and skips them. Each video's output is committed atomically
   before its journal line, so a resumed run produces the same result as an uninterrupted one;
6. writes ``manifest.json``: fingerprint, parameters, upstream fingerprints, counts, timings, failures and
   library versions. A run with failures is marked incomplete (exit status 1) unless failures are allowed.

Cache layout: ``<cache>/<stage key>/{manifest.json, run.json, journal.jsonl, log.txt, ...}`` with the lock
file beside the folder (``<cache>/<stage key>.lock``).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

#: Version of the cache layout itself (manifest and journal schema), checked when reading a cache folder.
CACHE_FORMAT = 1

log = logging.getLogger("pipeline")


class StageError(RuntimeError):
    """A stage cannot run: bad input, missing upstream, incompatible cache. The message says what to do."""


class StageLocked(StageError):
    """Another run holds the stage's lock."""


class StageFailures(StageError):
    """The stage finished but some videos failed (and failures were not allowed)."""


# ----------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------

def param(default: Any, help: str, *, fingerprint: bool = True, choices: Iterable[str] | None = None,
          cli: bool = True, **kw) -> Any:
    """A stage parameter: a dataclass field with help text (shown by ``--help``), optional choices, and
    whether it changes the output (``fingerprint=False`` for execution-only knobs like ``workers``)."""
    meta = {"help": help, "fingerprint": fingerprint, "choices": tuple(choices) if choices else None, "cli": cli}
    meta.update(kw)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def params_dict(params: Any, *, only_fingerprinted: bool = False) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(params):
        if only_fingerprinted and not f.metadata.get("fingerprint", True):
            continue
        out[f.name] = _jsonable(getattr(params, f.name))
    return out


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks (weights files, external score files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    blob = json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Stage declaration
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What a stage's ``plan`` returns: an input digest (part of the fingerprint) and anything ``run`` needs."""

    inputs_digest: str = ""
    data: Any = None
    describe: str = ""


@dataclass(frozen=True)
class Stage:
    name: str
    version: str
    params_type: type
    run: Callable[["StageContext", Plan], dict]
    plan: Callable[[Any, "Upstream"], Plan] = lambda params, upstream: Plan()
    upstream: Callable[..., tuple[str, ...]] = lambda params: ()
    key: Callable[[Any], str] | None = None
    help: str = ""

    def output_key(self, params: Any) -> str:
        return self.key(params) if self.key else self.name

    def upstream_keys(self, params: Any, cache_root: Path) -> tuple[str, ...]:
        """The upstream outputs this run reads. ``upstream`` takes ``(params)``, or ``(params, cache_root)``
        for a stage whose inputs are discovered in the cache (``evaluate`` reads every finished head)."""
        import inspect

        n = len(inspect.signature(self.upstream).parameters)
        return tuple(self.upstream(params, cache_root) if n >= 2 else self.upstream(params))


# ----------------------------------------------------------------------------------------------------------
# Cache folder access
# ----------------------------------------------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "w") as f:
        json.dump(_jsonable(obj), f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / "manifest.json"
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StageError(f"{path}: unreadable manifest ({e}); remove {stage_dir} to recompute it") from e
    if m.get("cache_format") != CACHE_FORMAT:
        raise StageError(f"{path}: written by cache format {m.get('cache_format')}, this pipeline uses "
                         f"{CACHE_FORMAT}; remove {stage_dir} (or use another --cache-dir) to recompute it")
    return m


@dataclass
class Upstream:
    """The complete manifests of the stage outputs a stage reads, by key, plus their folders."""

    cache_root: Path
    manifests: dict[str, dict]

    def dir(self, key: str) -> Path:
        return self.cache_root / key

    def fingerprints(self) -> dict[str, str]:
        return {k: m["fingerprint"] for k, m in self.manifests.items()}


def load_upstream(cache_root: Path, keys: Iterable[str], for_stage: str) -> Upstream:
    manifests = {}
    for key in keys:
        m = read_manifest(cache_root / key)
        if m is None:
            raise StageError(f"stage {for_stage!r} reads the output of {key!r}, which is missing in "
                             f"{cache_root / key}: run `pipeline {key.split('/')[0]}` first")
        if not m.get("complete"):
            raise StageError(f"stage {for_stage!r} reads the output of {key!r}, which is incomplete "
                             f"({m.get('failed', 0)} failures): re-run `pipeline {key.split('/')[0]}` "
                             "or allow failures there")
        manifests[key] = m
    return Upstream(cache_root, manifests)


# ----------------------------------------------------------------------------------------------------------
# Journal: per-video records, appended after each video's output is committed
# ----------------------------------------------------------------------------------------------------------

class Journal:
    """Append-only JSON-lines record of finished and failed videos of one run (``journal.jsonl``).

    Each line is written and fsynced after the video's output was committed, so on resume every
    recorded success has its output on disk. A torn last line (a kill mid-write) is ignored.
    """

    def __init__(self, path: Path, *, read_all_ranks: bool = True):
        self.path = path
        self.done: dict[str, dict] = {}
        self.failed: dict[str, str] = {}
        # Under torchrun each rank appends to its own file (journal.jsonl for rank 0, journal.rank<R>.jsonl);
        # every rank reads them all, so a resumed run skips what any rank finished.
        files = sorted(path.parent.glob("journal*.jsonl")) if read_all_ranks else [path]
        for file in files:
            if not file.exists():
                continue
            for line in file.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                vid = rec.get("video")
                if rec.get("ok"):
                    self.done[vid] = rec
                    self.failed.pop(vid, None)
                elif vid not in self.done:
                    self.failed[vid] = rec.get("reason", "unknown")
        self._fh = open(path, "a")

    def is_done(self, video_id: str) -> bool:
        return video_id in self.done

    def _append(self, rec: dict) -> None:
        self._fh.write(json.dumps(_jsonable(rec), sort_keys=True) + "\n")
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

    def close(self) -> None:
        self._fh.close()


# ----------------------------------------------------------------------------------------------------------
# Running a stage
# ----------------------------------------------------------------------------------------------------------

@dataclass
class StageContext:
    """What a stage's ``run`` receives."""

    stage: Stage
    params: Any
    dir: Path
    upstream: Upstream
    journal: Journal
    fingerprint: str
    allow_failures: bool = False
    log: logging.Logger = log
    rank: int = 0
    world_size: int = 1

    def shard(self, items):
        """This rank's share of ``items`` under torchrun (round robin); all of them in a single process."""
        return list(items[self.rank::self.world_size])

    def progress(self, total: int, desc: str, unit: str = "video", **kw):
        from tqdm import tqdm

        disable = kw.pop("disable", None) if self.rank == 0 else True
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, disable=disable, **kw)


@dataclass
class RunResult:
    key: str
    fingerprint: str
    skipped: bool
    manifest: dict
    message: str


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "av", "opencv-contrib-python-headless", "zarr", "h5py"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


_HELD_LOCKS: set[str] = set()


class _Lock:
    """Exclusive lock of one stage output, ``<cache>/<key>.lock``.

    A POSIX record lock (``fcntl.lockf``): the kernel drops it when the process dies, so a killed run never
    leaves a stale lock, and unlike ``flock`` it is not inherited by forked children (DataLoader workers),
    which may outlive a killed parent by seconds. POSIX locks do not conflict within one process, so the
    locks this process holds are also kept in ``_HELD_LOCKS``.
    """

    def __init__(self, path: Path, key: str):
        self.path, self.key, self.fh = path, key, None

    def _refuse(self, holder: str):
        return StageLocked(f"the output of {self.key!r} ({self.path.with_suffix('')}) is being written by "
                           f"{holder}; wait for that run to finish (a second run at once is refused)")

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ident = str(self.path.resolve())
        if ident in _HELD_LOCKS:
            raise self._refuse(f"this process (pid {os.getpid()})")
        self.fh = open(self.path, "a+")
        try:
            fcntl.lockf(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise self._refuse(holder) from None
        _HELD_LOCKS.add(ident)
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()} on {platform.node()} since {_now()}")
        self.fh.flush()
        return self

    def __exit__(self, *exc):
        _HELD_LOCKS.discard(str(self.path.resolve()))
        self.fh.truncate(0)
        self.fh.flush()
        fcntl.lockf(self.fh.fileno(), fcntl.LOCK_UN)
        self.fh.close()


def compute_fingerprint(stage: Stage, params: Any, upstream: Upstream, plan: Plan) -> str:
    return digest({
        "stage": stage.name,
        "version": stage.version,
        "params": params_dict(params, only_fingerprinted=True),
        "upstream": upstream.fingerprints(),
        "inputs": plan.inputs_digest,
    })


def _attach_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("pipeline").addHandler(handler)
    return handler


def _tell_ranks(decision: dict) -> None:
    """Rank 0's final decision (skip or error) to the other ranks, who leave after receiving it."""
    from pipeline import dist

    if dist.world_size() > 1:
        dist.broadcast_object(decision)
        dist.barrier()


def run_stage(stage: Stage, params: Any, cache_root: Path, *, allow_failures: bool = False,
              force: bool = False) -> RunResult:
    """Run ``stage`` with ``params`` under ``cache_root`` following the contract in the module docstring.

    Under ``torchrun`` every rank calls this: rank 0 takes the lock, decides (fresh / clear / resume),
    writes run.json and, after every rank's ``run`` returned, the manifest; the other ranks follow its
    decision and run their share (``StageContext.shard``), each journaling to its own file.
    """
    from pipeline import dist

    cache_root = Path(cache_root)
    key = stage.output_key(params)
    out = cache_root / key
    world, rank = dist.world_size(), dist.rank()
    if world > 1:
        dist.init()
    if rank != 0:
        decision = dist.broadcast_object(None)
        if decision["action"] in ("error", "skip"):
            dist.barrier()  # rank 0 must not exit before every rank has received its decision
        if decision["action"] == "error":
            raise StageError(decision["message"])
        if decision["action"] == "skip":
            return RunResult(key, decision["fingerprint"], True, decision["manifest"], decision["message"])
        upstream = load_upstream(cache_root, stage.upstream_keys(params, cache_root), stage.name)
        plan = stage.plan(params, upstream)
        journal = Journal(out / f"journal.rank{rank}.jsonl")
        try:
            ctx = StageContext(stage, params, out, upstream, journal, decision["fingerprint"], allow_failures,
                               rank=rank, world_size=world)
            stage.run(ctx, plan)
        finally:
            journal.close()
            dist.barrier()  # every rank finished its share
        dist.barrier()  # rank 0 wrote the manifest
        manifest = read_manifest(out) or {}
        return RunResult(key, decision["fingerprint"], False, manifest, f"{key}: rank {rank} finished its share")

    try:
        upstream = load_upstream(cache_root, stage.upstream_keys(params, cache_root), stage.name)
        plan = stage.plan(params, upstream)
        fp = compute_fingerprint(stage, params, upstream, plan)
        lock = _Lock(cache_root / f"{key}.lock", key)
        lock.__enter__()
    except StageError as e:
        _tell_ranks({"action": "error", "message": str(e)})
        raise
    try:
        try:
            manifest = read_manifest(out)
        except StageError as e:
            _tell_ranks({"action": "error", "message": str(e)})
            raise
        if manifest and manifest.get("complete") and manifest["fingerprint"] == fp and not force:
            msg = (f"{key}: fresh (fingerprint {fp[:12]}, finished {manifest.get('finished')}); nothing to do")
            if (manifest.get("summary") or {}).get("line"):
                msg += f"\nlast run: {manifest['summary']['line']}"
            _tell_ranks({"action": "skip", "fingerprint": fp, "manifest": manifest, "message": msg})
            return RunResult(key, fp, True, manifest, msg)

        run_info = None
        if (out / "run.json").exists():
            try:
                run_info = json.loads((out / "run.json").read_text())
            except json.JSONDecodeError:
                run_info = None
        if out.exists() and (force or run_info is None or run_info.get("fingerprint") != fp
                             or run_info.get("cache_format") != CACHE_FORMAT):
            # Parameters, code version or upstream changed (or the user forced it): previous output is stale.
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        resumed = any(out.glob("journal*.jsonl"))
        if (out / "manifest.json").exists():
            (out / "manifest.json").unlink()  # a manifest only ever describes a finished run
        started = _now()
        write_json_atomic(out / "run.json", {
            "cache_format": CACHE_FORMAT, "stage": stage.name, "version": stage.version, "fingerprint": fp,
            "params": params_dict(params), "upstream": upstream.fingerprints(), "started": started,
            "world_size": world,
        })
        dist.broadcast_object({"action": "run", "fingerprint": fp})
        handler = _attach_log_file(out / "log.txt")
        journal = Journal(out / "journal.jsonl")
        t0 = time.perf_counter()
        try:
            log.info("%s: %s run, fingerprint %s%s%s", key, "resuming" if resumed else "starting", fp[:12],
                     f" ({plan.describe})" if plan.describe else "", f", {world} ranks" if world > 1 else "")
            ctx = StageContext(stage, params, out, upstream, journal, fp, allow_failures, rank=0, world_size=world)
            summary = stage.run(ctx, plan) or {}
        finally:
            journal.close()
            logging.getLogger("pipeline").removeHandler(handler)
            handler.close()
            dist.barrier()
        if world > 1:
            journal = Journal(out / "journal.jsonl")  # re-read: every rank's records
            journal.close()
        seconds = time.perf_counter() - t0
        failures = dict(sorted(journal.failed.items()))
        complete = not failures or allow_failures
        manifest = {
            "cache_format": CACHE_FORMAT, "stage": stage.name, "key": key, "version": stage.version,
            "fingerprint": fp, "params": params_dict(params), "upstream": upstream.fingerprints(),
            "started": started, "finished": _now(), "seconds": round(seconds, 3), "resumed": resumed,
            "done": len(journal.done), "failed": len(failures), "failures": failures,
            "complete": complete, "summary": summary, "versions": library_versions(), "world_size": world,
        }
        write_json_atomic(out / "manifest.json", manifest)
        dist.barrier()
    finally:
        lock.__exit__(None, None, None)
    line = summary.get("line") or f"{key}: {len(journal.done)} done, {len(failures)} failed in {seconds:.1f} s"
    if failures and not allow_failures:
        shown = "\n".join(f"  {v}: {r}" for v, r in list(failures.items())[:20])
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        raise StageFailures(f"{line}\n{len(failures)} video(s) failed (details in {out / 'manifest.json'}):\n"
                            f"{shown}{more}\nRe-run to retry them, or pass --allow-failures to accept them.")
    return RunResult(key, fp, False, manifest, line)


# ----------------------------------------------------------------------------------------------------------
# Status
# ----------------------------------------------------------------------------------------------------------

@dataclass
class StageStatus:
    key: str
    state: str  # fresh | stale | incomplete | missing
    reason: str = ""
    fingerprint: str = ""
    finished: str = ""
    done: int = 0
    failed: int = 0


def stage_keys_in_cache(cache_root: Path) -> list[str]:
    """Every stage output folder (one holding run.json) under the cache, e.g. 'decode', 'finetune/rgb'."""
    keys = []
    if cache_root.is_dir():
        for run_json in cache_root.rglob("run.json"):
            rel = run_json.parent.relative_to(cache_root).as_posix()
            if not any(p.startswith(".tmp-") for p in rel.split("/")):
                keys.append(rel)
    return sorted(keys)


def status(cache_root: Path, stages: Iterable[Stage]) -> list[StageStatus]:
    """Fresh / stale (and why) / incomplete / missing for every declared stage and every output in the cache."""
    cache_root = Path(cache_root)
    by_name = {s.name: s for s in stages}
    keys = stage_keys_in_cache(cache_root)
    present = {k.split("/")[0] for k in keys}
    rows: list[StageStatus] = []
    manifests: dict[str, dict | None] = {}
    for key in keys:
        try:
            manifests[key] = read_manifest(cache_root / key)
        except StageError as e:
            rows.append(StageStatus(key, "stale", str(e)))
            manifests[key] = None
    for key in keys:
        if any(r.key == key for r in rows):
            continue
        m = manifests[key]
        if m is None:
            info = json.loads((cache_root / key / "run.json").read_text())
            rows.append(StageStatus(key, "incomplete", "started " + info.get("started", "?") +
                                    ", not finished (re-run the stage to resume)", info.get("fingerprint", "")))
            continue
        row = StageStatus(key, "fresh", "", m["fingerprint"], m.get("finished", ""), m.get("done", 0),
                          m.get("failed", 0))
        stage = by_name.get(m.get("stage", ""))
        reasons = []
        if not m.get("complete"):
            row.state = "incomplete"
            reasons.append(f"{m.get('failed', 0)} failures not allowed")
        if stage is not None and stage.version != m.get("version"):
            reasons.append(f"stage code version changed ({m.get('version')} -> {stage.version})")
        for up_key, up_fp in (m.get("upstream") or {}).items():
            up = manifests.get(up_key)
            if up is None:
                reasons.append(f"upstream {up_key} is missing or unfinished")
            elif up["fingerprint"] != up_fp:
                reasons.append(f"upstream {up_key} changed ({up_fp[:8]} -> {up['fingerprint'][:8]})")
        if reasons and row.state == "fresh":
            row.state = "stale"
        row.reason = "; ".join(reasons)
        rows.append(row)
    # Staleness flows downstream: a fresh output that reads a stale or unfinished one is stale too.
    state = {r.key: r for r in rows}
    changed = True
    while changed:
        changed = False
        for r in rows:
            m = manifests.get(r.key)
            if r.state != "fresh" or not m:
                continue
            for up_key in m.get("upstream") or {}:
                up = state.get(up_key)
                if up is not None and up.state != "fresh":
                    r.state, r.reason = "stale", f"upstream {up_key} is {up.state}"
                    changed = True
                    break
    for name in by_name:
        if name not in present:
            rows.append(StageStatus(name, "missing", "never run"))
    order = list(by_name)
    rows.sort(key=lambda r: (order.index(r.key.split("/")[0]) if r.key.split("/")[0] in order else 99, r.key))
    return rows
