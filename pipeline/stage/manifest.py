"""A stage folder's ``manifest.json`` and ``run.json``: the one reader (and writer) of each, and the one answer
to "which outputs of a stage are finished".

The runner writes ``run.json`` when a run starts and ``manifest.json`` when it has finished
(:mod:`pipeline.stage.runner`, whose docstring lists the fields). :func:`read_manifest` is the reader every
decision about freshness goes through: it refuses a torn file or one of another cache format with a
:class:`~pipeline.stage.errors.StageError` naming the file. :class:`Manifest` gives the fields by name
(``complete``, ``fingerprint``, ``params``, ``upstream``, the counts); it is also a read-only mapping over
the JSON object as written, so ``m["summary"]`` reads any other field.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.io.atomic import TMP_PREFIX, write_json
from pipeline.stage.errors import ManifestTorn, StageError
from pipeline.stage.keys import CACHE_FORMAT, MANIFEST, RUN_INFO, RUNS_DIR, SCOPED, TRASH_DIR, key_parts


@dataclass(frozen=True, eq=False)
class Manifest(Mapping):
    """The manifest of a finished run of one stage key (``<cache>/<key>/manifest.json``)."""

    path: Path
    data: Mapping[str, Any]

    @property
    def complete(self) -> bool:
        """Finished without failures (or with failures allowed) and not marked for redo by ``verify``."""
        return bool(self.data.get("complete"))

    @property
    def fingerprint(self) -> str:
        return str(self.data.get("fingerprint") or "")

    @property
    def params(self) -> dict:
        """Every parameter of the run (``recorded_as`` names for renamed ones)."""
        return dict(self.data.get("params") or {})

    @property
    def upstream(self) -> dict[str, str]:
        """Upstream key -> the fingerprint this run read."""
        return dict(self.data.get("upstream") or {})

    @property
    def stage(self) -> str:
        return str(self.data.get("stage") or "")

    @property
    def version(self) -> str | None:
        return self.data.get("version")

    @property
    def finished(self) -> str:
        return str(self.data.get("finished") or "")

    @property
    def done(self) -> int:
        return int(self.data.get("done") or 0)

    @property
    def failed(self) -> int:
        return int(self.data.get("failed") or 0)

    @property
    def failures(self) -> dict[str, str]:
        return dict(self.data.get("failures") or {})

    @property
    def damaged(self) -> list[str]:
        """The videos ``pipeline verify`` found damaged (then ``complete`` is False)."""
        return list(self.data.get("damaged") or [])

    @property
    def summary(self) -> dict:
        """What the stage's ``run`` returned (``line``: the one-line report)."""
        return dict(self.data.get("summary") or {})

    def __getitem__(self, name: str) -> Any:
        return self.data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"Manifest({str(self.path)!r}, complete={self.complete}, fingerprint={self.fingerprint[:12]!r})"


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_manifest(stage_dir: Path) -> Manifest | None:
    """A stage folder's manifest; None when the stage never finished there. A torn file (unreadable, not a
    manifest: a kill or a power cut mid-write) is a :class:`~pipeline.stage.errors.ManifestTorn` naming the file
    and the command that rebuilds it from the journal; a manifest of another cache format a StageError."""
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        data = _load_json(path)
    except (OSError, ValueError) as e:
        raise ManifestTorn(f"{path}: unreadable manifest ({e}); {_rebuild_hint(stage_dir)}") from e
    if not isinstance(data, dict):
        raise ManifestTorn(f"{path}: not a manifest (a JSON {type(data).__name__}); {_rebuild_hint(stage_dir)}")
    if data.get("cache_format") != CACHE_FORMAT:
        raise StageError(f"{path}: written by cache format {data.get('cache_format')}, this pipeline uses "
                         f"{CACHE_FORMAT}; remove {stage_dir} (or use another --cache-dir) to recompute it")
    if not isinstance(data.get("fingerprint"), str) or not data["fingerprint"]:
        raise ManifestTorn(f"{path}: not a manifest (no fingerprint); {_rebuild_hint(stage_dir)}")
    return Manifest(path, data)


def _rebuild_hint(stage_dir: Path) -> str:
    """What rebuilds a torn manifest: re-running the stage, which resumes the run recorded in run.json and
    skips every journaled video (a folder without run.json is kept in the run cache and recomputed)."""
    stage = (read_run_info(stage_dir) or {}).get("stage")
    cmd = f"`pipeline {stage}`" if stage else "its stage"
    return (f"re-run {cmd} with the same parameters to rebuild it from the journal and run.json (nothing "
            "journaled is recomputed; do not remove the folder)")


def peek_manifest(folder: Path) -> Manifest | None:
    """The manifest in ``folder`` whatever its cache format, None when absent or torn: for listing runs
    (a kept run of an older pipeline is still listed), never for deciding whether an output is fresh."""
    path = Path(folder) / MANIFEST
    try:
        data = _load_json(path)
    except (OSError, ValueError):
        return None
    return Manifest(path, data) if isinstance(data, dict) else None


def write_manifest(stage_dir: Path, data: dict) -> Manifest:
    """Write ``<stage_dir>/manifest.json`` atomically (the runner when a run finishes; ``verify`` marking a
    run for redo) and return it."""
    path = Path(stage_dir) / MANIFEST
    write_json(path, data)
    return Manifest(path, data)


def read_run_info(stage_dir: Path) -> dict | None:
    """A stage folder's ``run.json`` (written when a run starts), or None if absent or torn."""
    try:
        data = _load_json(Path(stage_dir) / RUN_INFO)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def output_keys(cache_root: Path, under: str = "") -> list[str]:
    """Every current stage output folder (one holding run.json or manifest.json) under ``<cache>/<under>``,
    as keys (``decode``, ``finetune/split1-resnet101/rgb``), sorted. The run cache (``.runs/``), the trash
    (``.trash/``), temporary folders and a stage folder's own outputs are not searched."""
    cache_root = Path(cache_root)
    top = cache_root / under if under else cache_root
    keys = []
    if top.is_dir():
        for dirpath, dirnames, filenames in os.walk(top):
            rel = Path(dirpath).relative_to(cache_root).as_posix()
            if rel != "." and (RUN_INFO in filenames or MANIFEST in filenames):
                keys.append(rel)
                dirnames.clear()  # a stage folder's outputs hold no other key (no scan of big stores)
            dirnames[:] = sorted(d for d in dirnames
                                 if d not in (RUNS_DIR, TRASH_DIR) and not d.startswith(TMP_PREFIX))
    return sorted(keys)


def finished_outputs(cache_root: Path, stage: str, scope: str | None = None) -> dict[str, Manifest]:
    """The complete outputs of ``stage`` (within ``scope``, e.g. ``split1-resnet101``, when given): key ->
    manifest, in key order. An output whose manifest cannot be read (torn, another cache format) is not
    finished, nor is one of the layout before per-scope keys (``finetune/rgb``); ``pipeline status`` says
    why."""
    out = {}
    for key in output_keys(cache_root, f"{stage}/{scope}" if scope else stage):
        if stage in SCOPED and key_parts(key).split is None:
            continue
        try:
            m = read_manifest(Path(cache_root) / key)
        except StageError:
            continue
        if m is not None and m.complete:
            out[key] = m
    return out
