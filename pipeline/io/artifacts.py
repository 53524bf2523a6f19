"""The one way to find and open a stage's outputs.

Every stage's output lives in ``<cache>/<key>/``. This module names those keys and the files inside them,
and opens the stores a finished stage wrote (reading the store kind from its manifest). Stages reach their
upstream's outputs only through here, never by importing another stage's module.

| stage            | key                         | what is inside                                             |
|------------------|-----------------------------|------------------------------------------------------------|
| decode           | ``decode``                  | ``frames/`` (one container per video), ``videos.json``     |
| extract-flow     | ``extract-flow``            | ``flow/`` (one container per video)                        |
| finetune         | ``finetune/<stream>``       | ``best.pt``, ``last.pt``, ``test_scores.npz``, plots       |
| extract-features | ``extract-features``        | ``features.zarr`` and/or ``features.h5``                   |
| train-head       | ``train-head/<name>``       | ``best.pt``, ``results.json``, ``test_scores.npz``         |
| refine           | ``refine/<name>``           | ``best.pt``, ``last.pt``, ``results.json``, ``test_scores.npz`` |
| evaluate         | ``evaluate``                | ``results.md``, ``results.json``, plots                    |
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.io.store import BACKENDS, VideoStore

#: Stage names; a key is the name, or ``<name>/<variant>`` for the stages with one output per variant.
DECODE = "decode"
FLOW = "extract-flow"
FINETUNE = "finetune"
FEATURES = "extract-features"
TRAIN_HEAD = "train-head"
REFINE = "refine"
EVALUATE = "evaluate"

#: File names inside a stage's folder.
BEST = "best.pt"
LAST = "last.pt"
RESULTS = "results.json"
SCORES = "test_scores.npz"
TABLE = "videos.json"
FRAMES_DIR = "frames"
FLOW_DIR = "flow"
FEATURE_FILES = {"zarr": "features.zarr", "h5": "features.h5"}


class ArtifactError(RuntimeError):
    """A stage's output is missing or unreadable; the message names the file and the stage to re-run."""


def finetune_key(stream: str) -> str:
    return f"{FINETUNE}/{stream}"


def head_key(name: str) -> str:
    return f"{TRAIN_HEAD}/{name}"


def refine_key(name: str) -> str:
    return f"{REFINE}/{name}"


def split_key(key: str) -> tuple[str, str]:
    """``"finetune/rgb"`` -> ``("finetune", "rgb")``; ``"decode"`` -> ``("decode", "")``."""
    stage, _, variant = key.partition("/")
    return stage, variant


def manifest_params(stage_dir: Path) -> dict:
    """The parameters recorded in a finished stage's ``manifest.json``."""
    path = Path(stage_dir) / "manifest.json"
    try:
        return dict(json.loads(path.read_text()).get("params") or {})
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e}); re-run the stage that writes {stage_dir}") from e


def _store_kind(stage_dir: Path, stage: str) -> str:
    params = manifest_params(stage_dir)
    kind = params.get("store")
    if kind not in BACKENDS:
        raise ArtifactError(f"{Path(stage_dir) / 'manifest.json'} does not name its store (params.store); "
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
