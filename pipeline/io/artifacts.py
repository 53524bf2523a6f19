"""The one way to open a stage's outputs: its stores, checkpoints and results.

The names (stage names, keys, scopes, the file names inside a stage folder) have their one home in
:mod:`pipeline.stage.keys` (re-exported here, so ``artifacts.head_key``, ``artifacts.BEST``, ... read as
before) and a folder's manifest in :mod:`pipeline.stage.manifest`. This module opens what a finished stage
wrote: the frame and flow stores (reading the store kind from the manifest), the feature store file, a
checkpoint (:func:`checkpoint_file`; a finetune checkpoint checked against the video table:
:func:`finetune_checkpoint`) and ``results.json``. Stages reach their upstream's outputs only through here,
never by importing another stage's module.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from pipeline.io.atomic import load_checkpoint
from pipeline.io.store import BACKENDS, VideoStore
from pipeline.stage.errors import ArtifactError
from pipeline.stage.keys import (ABLATE, ABLATE_CHART, ABLATE_JSON, BEST, CONFUSION, CURVES, DECODE, DEFAULT_BACKBONE,
                                 EVALUATE, FEATURE_FILES, FEATURES, FINETUNE, FLOW, FLOW_DIR, FRAMES_DIR, HISTORY, LAST,
                                 MANIFEST, REFINE, REPORT, REPORT_PAGE, RESULTS, RESULTS_MD, SCOPED, SCORES, TABLE,
                                 TRAIN_HEAD, TRAIN_NET, KeyParts, evaluate_key, features_key, finetune_key, head_key,
                                 key_parts, net_key, old_layout_hint, pair_backbone, parse_scope, refine_key, scope,
                                 scope_keys, split_key)
from pipeline.stage.manifest import read_manifest

__all__ = [
    # re-exported from pipeline.stage.keys, their one home
    "ABLATE", "ABLATE_CHART", "ABLATE_JSON", "BEST", "CONFUSION", "CURVES", "DECODE", "DEFAULT_BACKBONE", "EVALUATE",
    "FEATURE_FILES", "FEATURES", "FINETUNE", "FLOW", "FLOW_DIR", "FRAMES_DIR", "HISTORY", "LAST", "REFINE", "REPORT",
    "REPORT_PAGE", "RESULTS", "RESULTS_MD", "SCOPED", "SCORES", "TABLE", "TRAIN_HEAD", "TRAIN_NET", "KeyParts", "evaluate_key", "features_key", "finetune_key", "head_key",
    "key_parts", "net_key", "old_layout_hint", "pair_backbone", "parse_scope", "refine_key", "scope", "scope_keys",
    "split_key",
    # opening outputs
    "ArtifactError", "manifest_params", "frame_store", "flow_store", "feature_store_file", "checkpoint_file",
    "check_classes", "finetune_checkpoint", "FINETUNE_CHECKPOINT_KEYS", "read_results",
]


def manifest_params(stage_dir: Path) -> dict:
    """The parameters recorded in a finished stage's manifest (read by :func:`pipeline.stage.read_manifest`,
    which checks the cache format)."""
    m = read_manifest(stage_dir)
    if m is None:
        raise ArtifactError(f"{Path(stage_dir) / MANIFEST}: missing; run the stage that writes {stage_dir}")
    return m.params


def _store_kind(stage_dir: Path, stage: str) -> str:
    params = manifest_params(stage_dir)
    kind = params.get("store")
    if kind not in BACKENDS:
        raise ArtifactError(f"{Path(stage_dir) / MANIFEST} does not name its store (params.store); "
                            f"re-run `pipeline {stage}`")
    return kind


def frame_store(decode_dir: Path) -> VideoStore:
    """The frame store a finished ``decode`` wrote."""
    return VideoStore(Path(decode_dir) / FRAMES_DIR, _store_kind(decode_dir, DECODE))


def flow_store(flow_dir: Path) -> VideoStore:
    """The flow store a finished ``extract-flow`` wrote."""
    return VideoStore(Path(flow_dir) / FLOW_DIR, _store_kind(flow_dir, FLOW))


def feature_store_file(features_dir: Path, kind: str | None = None) -> Path:
    """``features.zarr`` or ``features.h5`` of a finished ``extract-features`` (Zarr first when both exist)."""
    features_dir = Path(features_dir)
    kinds = [kind] if kind else list(FEATURE_FILES)
    for k in kinds:
        path = features_dir / FEATURE_FILES[k]
        if path.exists():
            return path
    names = " or ".join(FEATURE_FILES[k] for k in kinds)
    raise ArtifactError(f"{features_dir}: no {names} (re-run `pipeline extract-features`)")


def checkpoint_file(stage_dir: Path, stage: str, name: str = BEST) -> Path:
    """A finished stage's checkpoint (``best.pt`` by default), or an error naming the stage to re-run."""
    path = Path(stage_dir) / name
    if not path.is_file():
        raise ArtifactError(f"{path}: the {stage} stage finished but its {name} is missing; "
                            f"re-run `pipeline {stage.split('/')[0]} --force`")
    return path


#: What every finetune checkpoint holds besides its weights (``stages/finetune.py`` writes them).
FINETUNE_CHECKPOINT_KEYS = ("model", "arch", "num_classes", "in_channels", "classes")


def check_classes(path: Path, ckpt: Mapping, classes: Sequence[str], stage: str) -> None:
    """A checkpoint's classifier against the video table's classes: its width (``num_classes``) and, where it
    records them, the names in order. An ArtifactError naming the file and the stage to re-run otherwise."""
    classes = list(classes)
    n = ckpt.get("num_classes")
    if n != len(classes):
        raise ArtifactError(f"{path}: a {n}-way classifier, the video table has {len(classes)} classes; it was "
                            f"trained on another dataset (re-run `pipeline {stage}` on this one)")
    recorded = ckpt.get("classes")
    if recorded is not None and list(recorded) != classes:
        raise ArtifactError(f"{path}: its classes {list(recorded)[:5]} differ from the video table's "
                            f"{classes[:5]}; it was trained on another dataset (re-run `pipeline {stage}` on "
                            "this one)")


def finetune_checkpoint(stage_dir: Path, classes: Sequence[str]) -> tuple[Path, dict]:
    """(path, checkpoint) of a finished ``finetune`` output's ``best.pt``, read on the CPU and checked
    against the video table's ``classes`` (:func:`check_classes`); an ArtifactError naming the file when it
    is missing, unreadable, not a finetune checkpoint or of other classes."""
    path = checkpoint_file(stage_dir, FINETUNE)
    try:
        ckpt = load_checkpoint(path, require=FINETUNE_CHECKPOINT_KEYS)
    except ValueError as e:
        raise ArtifactError(f"{e} (expected a finetune checkpoint; re-run `pipeline finetune --force`)") from None
    check_classes(path, ckpt, classes, FINETUNE)
    return path, ckpt


def read_results(stage_dir: Path, stage: str) -> dict:
    """A finished stage's ``results.json``, or an error naming the file and the stage to re-run."""
    path = Path(stage_dir) / RESULTS
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot read the {stage} results ({e}); re-run "
                            f"`pipeline {stage.split('/')[0]} --force`") from None
    if not isinstance(results, dict):
        raise ArtifactError(f"{path}: not a results file (a {type(results).__name__}); re-run "
                            f"`pipeline {stage.split('/')[0]} --force`")
    return results
