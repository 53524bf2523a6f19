"""``pipeline status``: which stage outputs are fresh, stale (and why), incomplete, running or missing."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pipeline.stage.declare import Stage
from pipeline.stage.errors import ManifestTorn, StageError
from pipeline.stage.journal import journal_files, read_records
from pipeline.stage.keys import MANIFEST, lock_path, old_layout_hint
from pipeline.stage.lock import lock_holder
from pipeline.stage.manifest import Manifest, output_keys, read_manifest, read_run_info
from pipeline.stage import runcache


@dataclass
class StageStatus:
    key: str
    state: str  # fresh | stale | incomplete | running | missing
    reason: str = ""
    fingerprint: str = ""
    finished: str = ""
    done: int = 0
    failed: int = 0
    kept: int = 0  # other runs of this key kept in the run cache
    kept_size: int = -1  # their bytes on disk (measured only with ``sizes=True``)


def stage_keys_in_cache(cache_root: Path) -> list[str]:
    """Every current stage output folder under the cache, e.g. 'decode', 'finetune/split1-resnet101/rgb'
    (:func:`pipeline.stage.manifest.output_keys`)."""
    return output_keys(cache_root)


def _unfinished(cache_root: Path, key: str) -> StageStatus:
    """A folder with run.json but no manifest: running (lock held) or an interrupted run to resume."""
    info = read_run_info(cache_root / key) or {}
    done, failed = read_records(journal_files(cache_root / key))
    pid = lock_holder(lock_path(cache_root, key))
    started = info.get("started", "?")
    if pid is not None:
        state, why = "running", f"running (pid {pid if pid > 0 else '?'}), started {started}"
    else:
        state, why = "incomplete", f"started {started}, not finished (re-run the stage to resume)"
    return StageStatus(key, state, why, info.get("fingerprint", ""), "", len(done), len(failed))


def status(cache_root: Path, stages: Iterable[Stage], *, sizes: bool = True) -> list[StageStatus]:
    """Fresh / stale (and why) / incomplete / running / missing for every declared stage and every output in
    the cache, with how many other runs of each key are kept (and their size, measured only for kept runs). A
    partial run counts its journaled videos as done."""
    cache_root = Path(cache_root)
    by_name = {s.name: s for s in stages}
    keys = stage_keys_in_cache(cache_root)
    present = {k.split("/")[0] for k in keys}
    rows: dict[str, StageStatus] = {}
    manifests: dict[str, Manifest | None] = {}
    for key in keys:
        try:
            manifests[key] = read_manifest(cache_root / key)
        except ManifestTorn as e:  # finished, but its manifest must be rebuilt (re-running the stage does it)
            info = read_run_info(cache_root / key) or {}
            rows[key] = StageStatus(key, "incomplete", str(e), info.get("fingerprint", ""))
            manifests[key] = None
        except StageError as e:
            rows[key] = StageStatus(key, "stale", str(e))
            manifests[key] = None
    for key in keys:
        if key in rows:
            continue
        m = manifests[key]
        if m is None or lock_holder(lock_path(cache_root, key)) is not None:
            rows[key] = _unfinished(cache_root, key)
            continue
        rows[key] = _finished(m, key, by_name.get(m.stage), manifests, cache_root)
    _propagate_staleness(rows, manifests)
    for key in runcache.keys_with_kept_runs(cache_root):
        if key not in rows:
            rows[key] = StageStatus(key, "missing", "no current run; `pipeline runs` lists the kept ones")
            present.add(key.split("/")[0])
        kept = runcache.kept_runs(cache_root, key, with_size=sizes)
        rows[key].kept = len(kept)
        rows[key].kept_size = sum(r.size for r in kept) if sizes else -1
    out = list(rows.values())
    for name in by_name:
        if name not in present:
            out.append(StageStatus(name, "missing", "never run"))
    order = list(by_name)
    out.sort(key=lambda r: (order.index(r.key.split("/")[0]) if r.key.split("/")[0] in order else 99, r.key))
    return out


def _finished(m: Manifest, key: str, stage: Stage | None, manifests: dict[str, Manifest | None],
              cache_root: Path) -> StageStatus:
    row = StageStatus(key, "fresh", "", m.fingerprint, m.finished, m.done, m.failed)
    reasons = []
    hint = old_layout_hint(key, m.params)
    if hint:
        row.state, row.reason = "old layout", hint
        return row
    if not m.complete:
        row.state = "incomplete"
        other = list(m.get("verify_findings") or [])
        if m.damaged or other:  # `pipeline verify` marked it for redo
            found = [f"{len(m.damaged)} videos missing/damaged"] if m.damaged else []
            found += [f"{other[0]}" + (f" (and {len(other) - 1} more)" if len(other) > 1 else "")] if other else []
            reasons.append(f"{'; '.join(found)} (found by verify): re-run `pipeline {key.split('/')[0]}` to "
                           "recompute them")
        if m.failed or not (m.damaged or other):
            reasons.append(f"{m.failed} failures not allowed")
    if stage is not None and stage.version != m.version:
        reasons.append(f"stage code version changed ({m.version} -> {stage.version})")
    for up_key, up_fp in m.upstream.items():
        up = manifests.get(up_key)
        if up is None:
            reasons.append(f"upstream {up_key} is missing or unfinished")
        elif up.fingerprint != up_fp:
            reasons.append(runcache.upstream_change(cache_root, up_key, up_fp, up))
    if reasons and row.state == "fresh":
        row.state = "stale"
    source = m.get("imported") or (stage.import_source(m.params) if stage is not None else "")
    if source:  # not a reason for staleness: what the output is (kept current by the runner, docs/rawframes.md)
        reasons.append(f"imported ({source})")
    truncated = m.summary.get("truncated") or {}
    if truncated:  # stored under --allow-truncated: not a failure, but never silent
        first = ", ".join(list(truncated)[:3]) + (", ..." if len(truncated) > 3 else "")
        reasons.append(f"{len(truncated)} video(s) stored truncated ({first}; details in {MANIFEST})")
    row.reason = "; ".join(reasons)
    return row


def _propagate_staleness(rows: dict[str, StageStatus], manifests: dict[str, Manifest | None]) -> None:
    """Staleness flows downstream: a fresh output that reads a stale or unfinished one is stale too."""
    changed = True
    while changed:
        changed = False
        for r in rows.values():
            m = manifests.get(r.key)
            if r.state != "fresh" or not m:
                continue
            for up_key in m.upstream:
                up = rows.get(up_key)
                if up is not None and up.state != "fresh":
                    r.state, r.reason = "stale", f"upstream {up_key} is {up.state}"
                    changed = True
                    break
