"""``pipeline verify``: find the missing and damaged data of the finished per-video stores (frames, flow,
features), each finding naming its file.

Missing: every video the journal and the video table list has its container; every container holds the image
sequence its stage writes (as many images as its attributes count) and every chunk file of each array (a Zarr
chunk whose file is gone reads back as zeros, so it is looked for on disk, :func:`pipeline.io.store.missing_chunks`);
the files the stage always writes are there (decode's ``videos.json``, both feature stores when extract-features
wrote both), and the journal counts the videos the manifest does. Damaged: every chunk is read in full, its
checksum verified.

A video with missing or damaged data is journaled for redo (a ``{"video", "ok": false, "damaged": true}``
record, which clears its earlier success) and the stage's manifest is marked incomplete (``damaged``: the
videos; ``verify_findings``: the rest), so re-running the stage recomputes exactly those videos (decode,
extract-flow; extract-features takes the others back from its consolidated store,
:func:`pipeline.features.restore_parts`) and rewrites its table or store. Nothing is deleted: a damaged
container stays until its recomputed one replaces it. A torn manifest is reported, not a crash: the store is
read with run.json's parameters, and re-running the stage rebuilds the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io.store import (CHECKSUMMED_FORMATS, StoreError, VideoStore, check_arrays, damaged_feature_videos)
from pipeline.stage.integrity import journaled, missing_data, recorded
from pipeline.stage.journal import Journal
from pipeline.stage.keys import (DECODE, FEATURE_FILES, FEATURES, FLOW, MANIFEST, RUN_INFO, TABLE,
                                 VIDEO_STORE_DIRS, journal_name, scope_keys)
from pipeline.stage.manifest import write_manifest

#: The image sequence each per-video stage's containers hold, and the attribute that counts its images.
SEQUENCES = {DECODE: {"frames": "num_frames"}, FLOW: {"flow": "num_flows"}}


@dataclass
class VerifyReport:
    key: str
    checked: int = 0
    damaged: dict[str, str] = field(default_factory=dict)  # video id -> what is missing or damaged, naming the file
    findings: list[str] = field(default_factory=list)  # the rest (a required file, the journal, the manifest)
    old_format: int = 0  # containers of an earlier store format (no checksums to verify)

    @property
    def problems(self) -> int:
        return len(self.damaged) + len(self.findings)


def verify_keys(cache_root: Path, stage: str | None = None) -> list[str]:
    """The finished output keys ``verify`` checks (every decode, extract-flow and extract-features output, or
    those of ``stage``); a folder whose manifest is torn counts (it holds run.json)."""
    cache_root = Path(cache_root)

    def finished(key: str) -> bool:
        return (cache_root / key / MANIFEST).exists()

    keys = [k for k in (DECODE, FLOW) if finished(k)]
    keys += [f"{FEATURES}/{scope}" for scope in scope_keys(cache_root, FEATURES) if finished(f"{FEATURES}/{scope}")]
    if stage is not None:
        keys = [k for k in keys if k == stage or k.startswith(stage + "/")]
    return keys


def verify_key(cache_root: Path, key: str, progress=None) -> VerifyReport:
    """Check one output; ``progress(n)`` is called per video checked."""
    folder = Path(cache_root) / key
    report = VerifyReport(key)
    missing = missing_data(folder)
    if missing.torn:
        report.findings.append(missing.torn)
    report.findings += missing.files
    _, info, _ = recorded(folder)
    params = dict(info.get("params") or {})
    if not info:
        report.findings.append(f"{folder / RUN_INFO}: missing or torn, and no readable manifest: the store "
                               "kind is unknown; re-run the stage")
        return report
    if key.startswith(FEATURES):
        _verify_features(folder, params, report)
    else:
        _verify_videos(folder, key, params, report, progress)
    for vid, why in missing.videos.items():
        report.damaged.setdefault(vid, why)
    return report


def _verify_features(folder: Path, params: dict, report: VerifyReport) -> None:
    """Every feature store the run wrote (both ``features.zarr`` and ``features.h5`` when there are two), each
    against the journal's videos."""
    done, _ = journaled(folder)
    for kind, name in FEATURE_FILES.items():
        path = folder / name
        if not path.exists():
            continue  # a store of the run's kind that is gone is a finding of missing_data
        report.checked += 1
        try:
            found = damaged_feature_videos(path, sorted(done))
        except Exception as e:  # noqa: BLE001 - an unopenable store: every video of it
            found = {v: f"{path}: cannot open ({type(e).__name__}: {e})" for v in done} or \
                {"*": f"{path}: cannot open ({type(e).__name__}: {e})"}
        for vid, why in found.items():
            if vid == "*":
                report.findings.append(why)
            else:
                report.damaged.setdefault(vid, why)


def _listed_videos(folder: Path, key: str) -> set[str]:
    """The videos the journal and (decode) the video table list."""
    done, _ = journaled(folder)
    listed = set(done)
    if key == DECODE and (folder / TABLE).exists():
        from pipeline.data.table import VideoTable

        try:
            listed |= set(VideoTable.load(folder).video_ids)
        except (OSError, ValueError, TypeError) as e:
            raise StoreError(f"{folder / TABLE}: unreadable video table ({type(e).__name__}: {e})") from e
    return listed


def _verify_videos(folder: Path, key: str, params: dict, report: VerifyReport, progress) -> None:
    kind = params.get("store")
    if kind not in ("zarr", "h5"):
        report.findings.append(f"{folder / RUN_INFO}: does not name its store (params.store); re-run the stage")
        return
    store = VideoStore(folder / VIDEO_STORE_DIRS[key], kind)
    try:
        listed = _listed_videos(folder, key)
    except StoreError as e:
        report.findings.append(str(e))
        listed = journaled(folder)[0].keys()
    for vid in sorted(set(listed) | set(store.video_ids())):
        report.checked += 1
        try:
            with store.reader(vid) as r:
                if r.attrs.get("format_version") not in CHECKSUMMED_FORMATS:
                    report.old_format += 1  # no checksums to verify; still read in full
                problems = check_arrays(r, SEQUENCES[key])
        except StoreError as e:
            problems = [str(e)]
        except Exception as e:  # noqa: BLE001 - an unopenable container is damaged
            problems = [f"cannot open: {type(e).__name__}: {e}"]
        if problems:
            path = str(store.path(vid))
            report.damaged[vid] = "; ".join(p if p.startswith(path) else f"{path}: {p}" for p in problems)
        if progress:
            progress(1)


def mark_for_redo(cache_root: Path, report: VerifyReport) -> None:
    """Journal the videos with missing or damaged data for redo and mark the output's manifest incomplete
    (re-running the stage then recomputes exactly them, and rewrites its table or store). A torn manifest is
    left for the re-run to rebuild."""
    if not report.problems:
        return
    out = Path(cache_root) / report.key
    if report.damaged:
        journal = Journal(out / journal_name(0), read_all_ranks=False)
        try:
            for vid, reason in sorted(report.damaged.items()):
                journal.record_damaged(vid, reason)
        finally:
            journal.close()
    manifest, _, _ = recorded(out)
    if manifest:
        write_manifest(out, {**manifest.data, "complete": False, "damaged": sorted(report.damaged),
                             "verify_findings": report.findings})
