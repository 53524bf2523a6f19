"""The errors of the stage contract. Each message says what to do (which file, which command to run)."""
from __future__ import annotations


class StageError(RuntimeError):
    """A stage cannot run: bad input, missing upstream, incompatible cache. The message says what to do."""


class StageLocked(StageError):
    """Another run holds the stage's lock."""


class StageFailures(StageError):
    """The stage finished but some videos failed (and failures were not allowed)."""


class ArtifactError(StageError):
    """A stage's output is missing or unreadable; the message names the file and the stage to re-run."""


class ManifestTorn(StageError):
    """A stage folder's ``manifest.json`` is torn (unreadable, not a manifest): the runner rebuilds it from the
    journal and ``run.json`` by resuming the run (nothing journaled is recomputed)."""


class DiskFull(StageError):
    """Not enough free disk space for a run (before work), or the disk filled up during it (ENOSPC): the
    message names the path, the space needed and what frees it (:mod:`pipeline.stage.space`)."""


class CacheReadOnly(StageError):
    """The cache cannot be written (a read-only file system or no write permission) and the run must write."""
