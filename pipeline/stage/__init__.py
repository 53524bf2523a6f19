"""The stage contract: declarations, per-video journals, locking, running and status.

``declare`` (parameters, Plan, Stage, upstream manifests), ``journal``, ``lock``, ``runner`` (:func:`run_stage`,
whose docstring states the contract), ``status`` and ``config`` (TOML and parameter building). Everything
public is re-exported here: ``from pipeline.stage import run_stage, param, ...``.
"""
from pipeline.stage.declare import (CACHE_FORMAT, MANIFEST, RUN_INFO, Plan, Stage, StageError, StageFailures,
                                    StageLocked, Upstream, digest, file_sha256, load_upstream, param, params_dict,
                                    read_manifest, read_run_info)
from pipeline.stage.journal import Journal, read_records
from pipeline.stage.lock import StageLock, lock_holder, lock_path
from pipeline.stage.runner import RunResult, StageContext, compute_fingerprint, library_versions, run_stage
from pipeline.stage import runcache  # noqa: F401  (the run cache: kept runs, gc)
from pipeline.stage.status import StageStatus, stage_keys_in_cache, status

__all__ = [
    "CACHE_FORMAT", "MANIFEST", "RUN_INFO", "Plan", "Stage", "StageError", "StageFailures", "StageLocked",
    "Upstream", "digest", "file_sha256", "load_upstream", "param", "params_dict", "read_manifest",
    "read_run_info", "Journal", "read_records", "StageLock", "lock_holder", "lock_path", "RunResult",
    "StageContext", "compute_fingerprint", "library_versions", "run_stage", "StageStatus",
    "stage_keys_in_cache", "status", "runcache",
]
