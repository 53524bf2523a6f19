"""What a run folder is missing, against its own record: the journal, the manifest and the files its stage
always writes. Used before a kept run is made current again (:mod:`pipeline.stage.runner`: a run missing data is
not restored as finished) and by ``pipeline verify`` (:mod:`pipeline.stage.verify`, which also reads the data).

Only file existence is checked here (fast: one ``stat`` per video); that is what a deletion killed half-way, or a
file removed by hand, leaves behind.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.stage.errors import StageError
from pipeline.stage.journal import journal_files, read_records
from pipeline.stage.keys import (DECODE, FEATURE_FILES, FEATURES, FLOW, JOURNAL, REQUIRED_FILES, VIDEO_STORE_DIRS)
from pipeline.stage.manifest import Manifest, read_manifest, read_run_info

#: The stages whose journal lists videos with an output each, and whose re-run rewrites their table or store
#: from the journal: a run of theirs missing data is resumed (the missing videos redone), not recomputed.
PER_VIDEO = (DECODE, FLOW, FEATURES)


@dataclass
class Missing:
    """What a run folder lacks: ``videos`` (journaled video -> what is missing, naming the file), ``files``
    (everything else, each naming the file: a required file, a short journal) and ``torn`` (the problem with a
    torn manifest, rebuilt from the journal by resuming the run)."""

    stage: str = ""
    videos: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    torn: str = ""

    def __bool__(self) -> bool:
        return bool(self.videos or self.files or self.torn)

    @property
    def resumable(self) -> bool:
        """Resuming the run in its folder repairs it: a per-video stage redoes the videos it lost and rewrites
        its table or store; any other stage only rebuilds a torn manifest that way (a lost checkpoint or result
        is recomputed instead)."""
        return self.stage in PER_VIDEO or not (self.videos or self.files)

    def describe(self, limit: int = 3) -> str:
        items = ([self.torn] if self.torn else []) + self.files + [f"{v}: {why}"
                                                                   for v, why in sorted(self.videos.items())]
        more = f"; ... {len(items) - limit} more" if len(items) > limit else ""
        lead = f"{len(self.videos)} video(s) missing; " if self.videos else ""
        return lead + "; ".join(items[:limit]) + more


def recorded(folder: Path) -> tuple[Manifest | None, dict, str]:
    """(manifest or None, the run's record: the manifest's fields, else run.json's, the problem with the manifest
    or ''): a torn manifest falls back on run.json, which holds the same parameters."""
    try:
        manifest = read_manifest(folder)
    except StageError as e:
        return None, read_run_info(folder) or {}, str(e)
    return manifest, dict(manifest.data) if manifest else (read_run_info(folder) or {}), ""


def journaled(folder: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(done, failed) of every rank's journal in ``folder``."""
    return read_records(journal_files(folder))


def missing_data(folder: Path) -> Missing:
    """What ``folder`` (a current or kept run) lacks against its own record: every journaled video's container
    (decode, extract-flow), a readable manifest where there is one, and for a finished run the files its stage
    always writes (:data:`~pipeline.stage.keys.REQUIRED_FILES`; extract-features: its feature store(s)) and
    journal records for as many videos as the manifest counts done."""
    from pipeline.io.store import VideoStore

    folder = Path(folder)
    manifest, info, torn = recorded(folder)
    stage = str(info.get("stage") or "")
    out = Missing(stage, torn=torn)
    done, _ = journaled(folder)
    finished = manifest is not None and manifest.complete
    if finished and manifest.done > len(done):
        out.files.append(f"{folder / JOURNAL}: journals {len(done)} finished videos, the manifest counts "
                         f"{manifest.done}")
    for name in REQUIRED_FILES.get(stage, ()) if finished else ():
        if not (folder / name).exists():
            out.files.append(f"{folder / name}: missing")
    params = dict(info.get("params") or {})
    if stage in VIDEO_STORE_DIRS and params.get("store") in ("zarr", "h5"):
        store = VideoStore(folder / VIDEO_STORE_DIRS[stage], params["store"])
        for vid in sorted(done):
            try:
                path = store.path(vid)
            except ValueError:
                continue
            if not path.exists():
                out.videos[vid] = f"{path}: missing"
    if stage == FEATURES and finished:
        kinds = list(FEATURE_FILES) if params.get("store") == "both" else [params.get("store")]
        for kind in kinds:
            if kind in FEATURE_FILES and not (folder / FEATURE_FILES[kind]).exists():
                out.files.append(f"{folder / FEATURE_FILES[kind]}: missing")
    return out
