"""Running a stage: the contract of :func:`run_stage`.

1. load the upstream manifests (each must be complete) and let the stage ``plan`` its work, which may
   raise a clear error before anything is written (bad paths, missing split files, ...);
2. compute the fingerprint = sha256 of the stage name, its version, the parameters it reads (fields marked
   ``fingerprint=False`` such as ``workers`` are left out; a stage may declare ``fingerprint_params``), the
   upstream fingerprints and the plan's input digest; all of it before running (DVC's run-cache rule);
3. take the stage's lock (:class:`~pipeline.stage.lock.StageLock`; a second concurrent run is refused with a
   clear message, and a killed run never leaves a stale lock). On a read-only cache the lock cannot be taken:
   a fresh output is still a no-op (nothing is written), anything else is "cache is read-only: <path>";
4. if a complete manifest with the same fingerprint exists, do nothing and say so. An output in place that was
   imported (``Stage.imported``: import-rawframes' decode and extract-flow) of the same upstream stays current
   when no parameter the user gave (``given``) differs from the import's, unless ``force``;
5. the run cache (:mod:`pipeline.stage.runcache`): a folder in place with another fingerprint (finished or
   partial) is moved to ``<cache>/.runs/<key>/<its fingerprint>/``, never deleted; a kept run with the
   requested fingerprint is moved back: a complete one is "restored from the run cache" with no recompute, a
   partial one is resumed. Before a kept run is made current it is checked against its own record
   (:func:`pipeline.stage.integrity.missing_data`: every journaled video's container, the files its stage
   always writes): one missing data is not restored as finished but resumed, its missing videos journaled for
   redo (or, for a stage without per-video outputs, recomputed), and the log says why; an intact copy kept as
   ``<fingerprint>.<n>`` is preferred. ``force`` moves the finished run of the same fingerprint aside and
   deletes it (renamed into the trash first: :func:`pipeline.stage.runcache.discard`) only once the new run
   has finished (a killed forced run leaves it kept). Partial work of the same fingerprint
   is resumed: the stage asks its
   :class:`~pipeline.stage.journal.Journal` which videos are done and skips them. Each video's output is
   committed atomically before its journal line, so a resumed run produces the same result as an
   uninterrupted one;
6. write ``manifest.json``: fingerprint, parameters, upstream fingerprints, counts, timings, failures and
   library versions. A run with failures is marked incomplete (exit status 1) unless failures are allowed.

Before a run writes, its plan's estimate of the bytes still to write (``Plan.space``, at least a floor) is
checked against the free space, and the first ENOSPC during the run stops it with the path and the space
needed (:mod:`pipeline.stage.space`); what finished is journaled, so the re-run resumes.

Cache layout: ``<cache>/<stage key>/{manifest.json, run.json, journal.jsonl, log.txt, ...}`` (the current run)
with the lock file beside the folder (``<cache>/<stage key>.lock``, one run of a key at a time whatever its
fingerprint) and the kept runs in ``<cache>/.runs/<stage key>/<fingerprint>/``. A lost or torn manifest.json
with run.json and the journal intact is rebuilt by re-running: the journaled work is skipped (the folder is
never to be removed for it).

Under ``torchrun`` every rank calls :func:`run_stage`: rank 0 takes the lock, decides (error / skip / run),
writes run.json and, after every rank's ``run`` returned, the manifest; the other ranks follow its decision
and run their share (``StageContext.shard``), each journaling to its own file.
"""
from __future__ import annotations

import dataclasses
import logging
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

from pipeline import dist
from pipeline.io.atomic import write_json
from pipeline.stage.declare import Plan, Stage, Upstream, digest, execution_only, load_upstream, params_dict
from pipeline.stage.errors import CacheReadOnly, ManifestTorn, StageError, StageFailures
from pipeline.stage.keys import CACHE_FORMAT, LOG, MANIFEST, RUN_INFO, journal_name
from pipeline.stage.manifest import Manifest, read_manifest, read_run_info, write_manifest
from pipeline.stage.journal import Journal, journal_files, read_records
from pipeline.stage.lock import StageLock, lock_path, now
from pipeline.stage import integrity, runcache
from pipeline.stage.space import disk_full_error, is_disk_full, require_free

log = logging.getLogger("pipeline")


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
    #: A stage that projects its output's size while writing (:class:`pipeline.stage.space.SpaceGuard`) sets
    #: it: a full disk's error then says how much the rest of the run needs.
    space: Any = None

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
    manifest: Manifest
    message: str
    restored: bool = False  # made current from the run cache, no recompute


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "av", "opencv-contrib-python-headless", "zarr", "h5py"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def compute_fingerprint(stage: Stage, params: Any, upstream: Upstream, plan: Plan) -> str:
    return digest({
        "stage": stage.name,
        "version": stage.version,
        "params": stage.fingerprinted(params, upstream),
        "upstream": upstream.fingerprints(),
        "inputs": plan.inputs_digest,
    })


def run_stage(stage: Stage, params: Any, cache_root: Path, *, allow_failures: bool = False,
              force: bool = False, given: Collection[str] | None = None) -> RunResult:
    """Run ``stage`` with ``params`` under ``cache_root`` following the contract in the module docstring.

    ``given``: the names of the parameters the user gave (command-line options, config keys;
    :func:`pipeline.stage.config.given_params`); None counts every parameter as given. A current output that
    was imported (``Stage.imported``: decode ``--dataset rawframes``, extract-flow ``--backend import``) stays
    current unless a given parameter differs from the import's or ``force``."""
    from pipeline.stage.validate import validate_params

    validate_params(params)  # every rank checks the same params: a bad value fails everywhere before any work
    cache_root = Path(cache_root)
    key = stage.output_key(params)
    if dist.world_size() > 1:
        dist.init()
    if dist.rank() != 0:
        return _follow_rank0(stage, params, cache_root, key, allow_failures)

    decided = False  # once the other ranks were told to run, an error no longer goes to them
    try:
        upstream = load_upstream(cache_root, stage.upstream_keys(params, cache_root), stage.name)
        plan = stage.plan(params, upstream)
        fp = compute_fingerprint(stage, params, upstream, plan)
        lock = StageLock(lock_path(cache_root, key), key)
        try:
            lock.__enter__()
        except CacheReadOnly as e:  # a fresh output needs no write lock: nothing is written
            fresh = (_fresh_result(cache_root / key, key, fp, force)
                     or _kept_import(stage, params, given, upstream, cache_root / key, key, force))
            if fresh is None:
                raise CacheReadOnly(f"{e}; {key} is not fresh and must be written (nothing was changed)") from None
            _tell_ranks({"action": "skip", "fingerprint": fresh.fingerprint, "manifest": fresh.manifest,
                         "message": fresh.message})
            return fresh
        try:  # the lock is held
            fresh = (_fresh_result(cache_root / key, key, fp, force)
                     or _kept_import(stage, params, given, upstream, cache_root / key, key, force))
            if fresh is None and not force:
                fresh = _from_run_cache(cache_root, key, fp)
            if fresh is not None:
                _tell_ranks({"action": "skip", "fingerprint": fresh.fingerprint, "manifest": fresh.manifest,
                             "message": fresh.message})
                return fresh
            _require_space(cache_root, key, fp, plan, force)
            decided = True
            manifest = _run(stage, params, cache_root, upstream, plan, fp, allow_failures, force)
        finally:
            lock.__exit__()
    except StageError as e:
        if not decided:
            _tell_ranks({"action": "error", "message": str(e)})
        raise
    return _result(key, fp, manifest, cache_root / key, allow_failures)


def _tell_ranks(decision: dict) -> None:
    """Rank 0's final decision (skip or error) to the other ranks, who leave after receiving it."""
    if dist.world_size() > 1:
        dist.broadcast_object(decision)
        dist.barrier()


def _follow_rank0(stage: Stage, params: Any, cache_root: Path, key: str, allow_failures: bool) -> RunResult:
    """A rank other than 0: wait for rank 0's decision; on "run", run this rank's share."""
    rank, world, out = dist.rank(), dist.world_size(), cache_root / key
    decision = dist.broadcast_object(None)
    if decision["action"] != "run":
        dist.barrier()  # rank 0 must not exit before every rank has received its decision
        if decision["action"] == "error":
            raise StageError(decision["message"])
        return RunResult(key, decision["fingerprint"], True, decision["manifest"], decision["message"])
    upstream = load_upstream(cache_root, stage.upstream_keys(params, cache_root), stage.name)
    plan = stage.plan(params, upstream)
    journal = Journal(out / journal_name(rank))
    try:
        ctx = StageContext(stage, params, out, upstream, journal, decision["fingerprint"], allow_failures,
                           rank=rank, world_size=world)
        stage.run(ctx, plan)
    finally:
        journal.close()
        dist.barrier()  # every rank finished its share
    dist.barrier()  # rank 0 wrote the manifest
    return RunResult(key, decision["fingerprint"], False, read_manifest(out),
                     f"{key}: rank {rank} finished its share")


def _fresh_result(out: Path, key: str, fp: str, force: bool) -> RunResult | None:
    """The no-op result when a complete manifest with fingerprint ``fp`` exists (and not ``force``). A torn
    manifest is not fresh: the run recorded in run.json is resumed, which rebuilds it (nothing journaled is
    recomputed)."""
    try:
        manifest = read_manifest(out)
    except ManifestTorn as e:
        log.warning("%s: %s", key, e)
        log.info("%s: rebuilding the torn manifest from the journal and run.json", key)
        return None
    if force or not manifest or not manifest.complete or manifest.fingerprint != fp:
        return None
    msg = f"{key}: fresh (fingerprint {fp[:12]}, finished {manifest.finished}); nothing to do"
    if manifest.summary.get("line"):
        msg += f"\nlast run: {manifest.summary['line']}"
    return RunResult(key, fp, True, manifest, msg)


def _kept_import(stage: Stage, params: Any, given: Collection[str] | None, upstream: Upstream, out: Path,
                 key: str, force: bool) -> RunResult | None:
    """The no-op result when the output in place is a complete import (``Stage.imported``) of the same upstream
    and no parameter the user gave differs from the import's: a plain ``pipeline extract-flow`` after
    ``import-rawframes`` keeps the imported flow (recomputing it could take a day of GPU time)."""
    if force or given is None:
        return None
    try:
        manifest = read_manifest(out)
    except StageError:  # torn: rebuilt by resuming its run, not kept as is
        return None
    if not manifest or not manifest.complete or manifest.stage != stage.name or manifest.version != stage.version:
        return None
    source = manifest.get("imported") or stage.import_source(manifest.params)
    if not source or manifest.upstream != upstream.fingerprints():
        return None
    wanted, recorded = params_dict(params, only_fingerprinted=True), manifest.params
    names = {f.name: f.metadata.get("recorded_as", f.name) for f in dataclasses.fields(params)}
    if any(names.get(n) in wanted and recorded.get(names[n]) != wanted[names[n]] for n in given):
        return None
    msg = (f"{key}: imported from {source} (fingerprint {manifest.fingerprint[:12]}, finished "
           f"{manifest.finished}); kept as current: no parameter given differs from the import's "
           f"(--force, or an option that differs such as --{_recompute_hint(recorded, wanted)}, recomputes it)")
    return RunResult(key, manifest.fingerprint, True, manifest, msg)


def _recompute_hint(recorded: dict, wanted: dict) -> str:
    """``backend torch``: the first parameter whose value differs between the import and the requested run."""
    for k in sorted(wanted):
        if recorded.get(k) != wanted[k]:
            return f"{k.replace('_', '-').rstrip('-')} {wanted[k]}"
    return "force"


def _require_space(cache_root: Path, key: str, fp: str, plan: Plan, force: bool) -> None:
    """Before work: the stage's estimate of what this run still writes (journaled videos of the same run
    excluded), at least the floor, against the cache's free space (:mod:`pipeline.stage.space`)."""
    out = cache_root / key
    done: dict = {}
    if not force and runcache.folder_fingerprint(out) == fp:
        done = read_records(journal_files(out))[0]
    need = plan.space.remaining(done) if plan.space is not None else 0
    what = f"{key} ({plan.space.what})" if plan.space is not None else key
    require_free(cache_root, need, what)


def _from_run_cache(cache_root: Path, key: str, fp: str) -> RunResult | None:
    """Make run ``fp`` of ``key`` current: the folder in place (another fingerprint) goes to the run cache and
    a kept run ``fp`` comes back. The restored result when that run is complete and nothing it recorded is
    missing, else None (run / resume: a run missing videos has them journaled for redo)."""
    out = cache_root / key
    if out.exists() and runcache.folder_fingerprint(out) == fp:
        return None  # partial work of this run in place (or its torn manifest): resumed
    chosen = _pick_kept(cache_root, key, fp)
    if chosen is None:
        return None  # a new run: _prepare_folder keeps what is in place
    src, missing = chosen
    where = runcache.stash(cache_root, key)
    if where is not None:
        log.info("%s: kept the run in place in the run cache (%s)", key, where)
    runcache.restore(cache_root, key, fp, src)
    if missing.videos:
        journal = Journal(out / journal_name(0), read_all_ranks=False)
        try:
            for vid, why in sorted(missing.videos.items()):
                journal.record_damaged(vid, f"missing when restored from the run cache: {why}")
        finally:
            journal.close()
    manifest = None if missing else read_manifest(out)
    if not manifest or not manifest.complete or manifest.fingerprint != fp:
        if missing:
            log.warning("%s: kept run %s (%s) is missing data: %s; resuming it (what is missing is recomputed)",
                        key, fp[:12], src.name, missing.describe())
        else:
            log.info("%s: partial run %s taken back from the run cache, resuming it", key, fp[:12])
        return None
    msg = f"{key}: restored from the run cache (fingerprint {fp[:12]}, finished {manifest.finished})"
    if manifest.summary.get("line"):
        msg += f"\nlast run: {manifest.summary['line']}"
    return RunResult(key, fp, True, manifest, msg, restored=True)


def _pick_kept(cache_root: Path, key: str, fp: str) -> tuple[Path, integrity.Missing] | None:
    """Which kept copy of run ``fp`` to take back (``<fp>`` or an ``<fp>.<n>``) and what it is missing: a
    finished one missing nothing first, else one a resume repairs (the first); None when no copy can be used
    (each is then left kept and a new run starts; the log says why)."""
    resumable = None
    for src in runcache.kept_copies(cache_root, key, fp):
        missing = integrity.missing_data(src)
        if not missing:
            manifest, _, _ = integrity.recorded(src)
            if manifest is not None and manifest.complete:
                return src, missing
        if missing.resumable:
            resumable = resumable or (src, missing)
        else:
            log.warning("%s: kept run %s (%s) is missing data (%s); not restored, a new run recomputes it "
                        "(`pipeline gc` removes the kept copy)", key, fp[:12], src, missing.describe())
    return resumable


def _prepare_folder(cache_root: Path, key: str, fp: str, force: bool) -> bool:
    """Keep what is in place in the run cache when it is another run (another fingerprint, unknown, or
    ``force``: the finished run is kept until the new one finishes), drop an old manifest; returns whether
    journaled work of the same run is resumed."""
    out = cache_root / key
    info = read_run_info(out)
    if out.exists() and (force or info is None
                         or info.get("fingerprint") != fp or info.get("cache_format") != CACHE_FORMAT):
        where = runcache.stash(cache_root, key)
        log.info("%s: the run in place is kept in the run cache (%s)", key, where)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a manifest only ever describes a finished run
    return bool(journal_files(out))


def _run(stage: Stage, params: Any, cache_root: Path, upstream: Upstream, plan: Plan, fp: str,
         allow_failures: bool, force: bool) -> Manifest:
    """Rank 0's run (the lock is held): prepare the folder, run every rank's share, write the manifest. The first
    ENOSPC anywhere stops it (what finished is journaled and kept), never one failure per remaining video."""
    contexts: list[StageContext] = []
    try:
        return _run_and_record(stage, params, cache_root, upstream, plan, fp, allow_failures, force, contexts)
    except OSError as e:
        if not is_disk_full(e):
            raise
        guard = contexts[0].space if contexts else None
        needed = guard.needed() if guard is not None else (plan.space.remaining() if plan.space else None)
        raise disk_full_error(e, cache_root, stage.output_key(params), needed) from None


def _run_and_record(stage: Stage, params: Any, cache_root: Path, upstream: Upstream, plan: Plan, fp: str,
                    allow_failures: bool, force: bool, contexts: list) -> Manifest:
    """:func:`_run`'s work; the run's context is appended to ``contexts`` once made."""
    world, key = dist.world_size(), stage.output_key(params)
    out = cache_root / key
    replaced = runcache.kept_dir(cache_root, key, fp) if force else None
    had_kept = replaced is not None and replaced.exists()
    resumed = _prepare_folder(cache_root, key, fp, force)
    started = now()
    write_json(out / RUN_INFO, {
        "cache_format": CACHE_FORMAT, "stage": stage.name, "version": stage.version, "fingerprint": fp,
        "params": params_dict(params), "upstream": upstream.fingerprints(), "started": started,
        "world_size": world, "execution_only": sorted(execution_only(type(params))),
    })
    dist.broadcast_object({"action": "run", "fingerprint": fp})
    handler = _attach_log_file(out / LOG)
    journal = Journal(out / journal_name(0))
    t0 = time.perf_counter()
    try:
        log.info("%s: %s run, fingerprint %s%s%s", key, "resuming" if resumed else "starting", fp[:12],
                 f" ({plan.describe})" if plan.describe else "", f", {world} ranks" if world > 1 else "")
        ctx = StageContext(stage, params, out, upstream, journal, fp, allow_failures, rank=0, world_size=world)
        contexts.append(ctx)
        summary = stage.run(ctx, plan) or {}
    finally:
        journal.close()
        logging.getLogger("pipeline").removeHandler(handler)
        handler.close()
        dist.barrier()
    if world > 1:
        journal = Journal(out / journal_name(0))  # re-read: every rank's records
        journal.close()
    failures = dict(sorted(journal.failed.items()))
    manifest = write_manifest(out, {
        "cache_format": CACHE_FORMAT, "stage": stage.name, "key": key, "version": stage.version,
        "fingerprint": fp, "params": params_dict(params), "upstream": upstream.fingerprints(),
        "started": started, "finished": now(), "seconds": round(time.perf_counter() - t0, 3), "resumed": resumed,
        "done": len(journal.done), "failed": len(failures), "failures": failures,
        "complete": not failures or allow_failures, "summary": summary, "versions": library_versions(),
        "world_size": world, "execution_only": sorted(execution_only(type(params))),
        **({"imported": source} if (source := stage.import_source(params_dict(params))) else {}),
    })
    if replaced is not None and not had_kept and replaced.exists() and manifest.complete:
        runcache.discard(cache_root, replaced)  # --force: the run it replaces (same fingerprint) is superseded
    dist.barrier()
    return manifest



def _result(key: str, fp: str, manifest: Manifest, out: Path, allow_failures: bool) -> RunResult:
    """The run's result, or StageFailures listing the failed videos when they are not allowed."""
    failures = manifest.failures
    line = (manifest.summary.get("line")
            or f"{key}: {manifest.done} done, {len(failures)} failed in {manifest['seconds']:.1f} s")
    if failures and not allow_failures:
        shown = "\n".join(f"  {v}: {r}" for v, r in list(failures.items())[:20])
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        raise StageFailures(f"{line}\n{len(failures)} video(s) failed (details in {out / MANIFEST}):\n"
                            f"{shown}{more}\nRe-run to retry them, or pass --allow-failures to accept them.")
    return RunResult(key, fp, False, manifest, line)


class _LogFile(logging.FileHandler):
    """The run's ``log.txt``; a full disk stops logging to it quietly (the run stops with a clear error)."""

    def handleError(self, record: logging.LogRecord) -> None:
        if is_disk_full(sys.exc_info()[1]):
            return
        super().handleError(record)


def _attach_log_file(path: Path) -> logging.Handler:
    handler = _LogFile(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("pipeline").addHandler(handler)
    return handler
