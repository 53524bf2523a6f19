"""``pipeline verify``: read every stored video of the finished per-video stores (frames, flow, features),
verifying each chunk's checksum, and list the damaged videos.

A damaged video is journaled for redo (a ``{"video", "ok": false, "damaged": true}`` record, which clears
its earlier success) and the stage's manifest is marked incomplete, so re-running the stage recomputes
exactly those videos (decode, extract-flow; extract-features takes the others back from its consolidated
store, :func:`pipeline.features.restore_parts`). Nothing is deleted: the damaged container stays until its
recomputed one replaces it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io import artifacts
from pipeline.io.store import CHECKSUMMED_FORMATS, StoreError, VideoStore, check_arrays, damaged_feature_videos
from pipeline.stage.journal import Journal
from pipeline.stage.keys import DECODE, FEATURES, FLOW, MANIFEST, journal_name, scope_keys
from pipeline.stage.manifest import read_manifest, write_manifest


@dataclass
class VerifyReport:
    key: str
    checked: int = 0
    damaged: dict[str, str] = field(default_factory=dict)  # video id -> reason naming the file
    old_format: int = 0  # containers of an earlier store format (no checksums to verify)


def verify_keys(cache_root: Path, stage: str | None = None) -> list[str]:
    """The finished output keys ``verify`` checks (every decode, extract-flow and extract-features output, or
    those of ``stage``)."""
    cache_root = Path(cache_root)
    keys = [k for k in (DECODE, FLOW) if (cache_root / k / MANIFEST).exists()]
    keys += [f"{FEATURES}/{scope}" for scope in scope_keys(cache_root, FEATURES)
             if (cache_root / FEATURES / scope / MANIFEST).exists()]
    if stage is not None:
        keys = [k for k in keys if k == stage or k.startswith(stage + "/")]
    return keys


def _video_store(cache_root: Path, key: str) -> VideoStore:
    if key == DECODE:
        return artifacts.frame_store(cache_root / key)
    return artifacts.flow_store(cache_root / key)


def verify_key(cache_root: Path, key: str, progress=None) -> VerifyReport:
    """Check one output; ``progress(n)`` is called per video checked."""
    cache_root = Path(cache_root)
    report = VerifyReport(key)
    if key.startswith(FEATURES):
        path = artifacts.feature_store_file(cache_root / key)
        report.damaged = damaged_feature_videos(path)
        report.checked = 1
        return report
    store = _video_store(cache_root, key)
    for vid in store.video_ids():
        report.checked += 1
        try:
            with store.reader(vid) as r:
                if r.attrs.get("format_version") not in CHECKSUMMED_FORMATS:
                    report.old_format += 1  # no checksums to verify; still read in full
                problems = check_arrays(r)
        except StoreError as e:
            problems = [str(e)]
        except Exception as e:  # noqa: BLE001 - an unopenable container is damaged
            problems = [f"cannot open: {type(e).__name__}: {e}"]
        if problems:
            report.damaged[vid] = f"{store.path(vid)}: " + "; ".join(problems)
        if progress:
            progress(1)
    return report


def mark_for_redo(cache_root: Path, report: VerifyReport) -> None:
    """Journal the damaged videos for redo and mark the output's manifest incomplete (re-running the stage
    then recomputes exactly them)."""
    if not report.damaged:
        return
    out = Path(cache_root) / report.key
    journal = Journal(out / journal_name(0), read_all_ranks=False)
    try:
        for vid, reason in sorted(report.damaged.items()):
            journal.record_damaged(vid, reason)
    finally:
        journal.close()
    manifest = read_manifest(out)
    if manifest:
        write_manifest(out, {**manifest.data, "complete": False, "damaged": sorted(report.damaged)})

