"""The stage contract: declarations, the cache layout, manifests, per-video journals, locking, running, status.

``keys`` (the cache layout: stage names, keys, scopes, file names; imports nothing of the pipeline),
``errors``, ``manifest`` (the one reader of ``manifest.json`` and ``run.json``, :func:`finished_outputs`),
``declare`` (parameters, Plan, Stage, upstream manifests), ``journal``, ``lock``, ``runner``
(:func:`run_stage`, whose docstring states the contract), ``status`` and ``config`` (TOML and parameter
building). Everything public is re-exported here: ``from pipeline.stage import run_stage, param, ...``.
"""
from pipeline.stage.errors import ArtifactError, StageError, StageFailures, StageLocked
from pipeline.stage.keys import CACHE_FORMAT, MANIFEST, RUN_INFO
from pipeline.stage.manifest import Manifest, finished_outputs, read_manifest, read_run_info
from pipeline.stage.declare import Plan, Stage, Upstream, digest, file_sha256, load_upstream, param, params_dict
from pipeline.stage.journal import Journal, read_records
from pipeline.stage.lock import StageLock, lock_holder, lock_path
from pipeline.stage.runner import RunResult, StageContext, compute_fingerprint, library_versions, run_stage
from pipeline.stage import runcache  # noqa: F401  (the run cache: kept runs, gc)
from pipeline.stage.status import StageStatus, stage_keys_in_cache, status

__all__ = [
    "CACHE_FORMAT", "MANIFEST", "RUN_INFO", "Plan", "Stage", "StageError", "StageFailures", "StageLocked",
    "ArtifactError", "Manifest", "finished_outputs",
    "Upstream", "digest", "file_sha256", "load_upstream", "param", "params_dict", "read_manifest",
    "read_run_info", "Journal", "read_records", "StageLock", "lock_holder", "lock_path", "RunResult",
    "StageContext", "compute_fingerprint", "library_versions", "run_stage", "StageStatus",
    "stage_keys_in_cache", "status", "runcache",
]
