"""The one way to find and open a stage's outputs.

Every stage's output lives in ``<cache>/<key>/``. This module names those keys and the files inside them,
and opens the stores a finished stage wrote (reading the store kind from its manifest). Stages reach their
upstream's outputs only through here, never by importing another stage's module.

``decode`` and ``extract-flow`` are shared by every split and backbone (one decode serves UCF101's three
splits, and the ResNet-101 and Inception-V3 configs share it). Every later stage's output is per *scope*:
the split and the backbone, ``split<k>-<backbone>`` (:func:`scope`), so the models of split 1 and split 2, or
of two backbones, exist side by side in one cache.

| stage            | key                                      | what is inside                                  |
|------------------|------------------------------------------|-------------------------------------------------|
| decode           | ``decode``                               | ``frames/`` (one container per video), ``videos.json`` |
| extract-flow     | ``extract-flow``                         | ``flow/`` (one container per video)             |
| finetune         | ``finetune/<scope>/<stream>``            | ``best.pt``, ``last.pt``, ``test_scores.npz``, plots |
| extract-features | ``extract-features/<scope>``             | ``features.zarr`` and/or ``features.h5``        |
| train-head       | ``train-head/<scope>/<name>``            | ``best.pt``, ``results.json``, ``test_scores.npz`` |
| refine           | ``refine/<scope>/<name>``                | ``best.pt``, ``last.pt``, ``results.json``, ``test_scores.npz`` |
| evaluate         | ``evaluate/<scope>``, ``evaluate/splits1-2-3-<backbone>`` | ``results.md``, ``results.json``, plots |
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

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


#: The backbone of a scope when none is named (finetune's and extract-features' default ``--arch``).
DEFAULT_BACKBONE = "resnet101"


def scope(split: int, backbone: str = DEFAULT_BACKBONE) -> str:
    """``split1-resnet101``: the split and backbone a per-scope output belongs to."""
    return f"split{int(split)}-{backbone}"


def parse_scope(text: str) -> tuple[int, str] | None:
    """``"split2-inception_v3"`` -> ``(2, "inception_v3")``; None for anything else."""
    m = re.fullmatch(r"split(\d+)-(.+)", text)
    return (int(m.group(1)), m.group(2)) if m else None


def finetune_key(stream: str, split: int = 1, backbone: str = DEFAULT_BACKBONE) -> str:
    return f"{FINETUNE}/{scope(split, backbone)}/{stream}"


def features_key(split: int = 1, backbone: str = DEFAULT_BACKBONE) -> str:
    return f"{FEATURES}/{scope(split, backbone)}"


def head_key(name: str, split: int = 1, backbone: str = DEFAULT_BACKBONE) -> str:
    return f"{TRAIN_HEAD}/{scope(split, backbone)}/{name}"


def refine_key(name: str, split: int = 1, backbone: str = DEFAULT_BACKBONE) -> str:
    return f"{REFINE}/{scope(split, backbone)}/{name}"


def evaluate_key(splits: Sequence[int] = (1,), backbone: str = DEFAULT_BACKBONE) -> str:
    """``evaluate/split1-resnet101`` for one split; ``evaluate/splits1-2-3-resnet101`` across several."""
    splits = [int(s) for s in splits]
    if len(splits) == 1:
        return f"{EVALUATE}/{scope(splits[0], backbone)}"
    return f"{EVALUATE}/splits{'-'.join(map(str, splits))}-{backbone}"


#: The stages whose outputs are per scope (split and backbone).
SCOPED = (FINETUNE, FEATURES, TRAIN_HEAD, REFINE, EVALUATE)


def old_layout_hint(key: str, params: dict) -> str | None:
    """For an output written before keys had a scope (``finetune/rgb``, cache format of 2026-12-01): what to
    do with it; None for a key of the current layout. A finetune output only needs moving (its upstream,
    decode and extract-flow, kept their keys, so it is fresh at its new place); the later stages read
    upstream keys that changed, so they are recomputed under their new keys."""
    stage, rest = split_key(key)
    if stage not in SCOPED or key_parts(key).split is not None:
        return None
    split = int(params.get("split") or 1)
    if stage == FINETUNE:
        new = finetune_key(rest, split, params.get("arch") or DEFAULT_BACKBONE)
        return f"old layout (before per-split keys): move it to {new} (mv {key} {new}) to keep using it"
    return (f"old layout (before per-split keys): its stage now writes {stage}/split<k>-<backbone>/...; "
            f"re-run it there (this folder is never removed by the pipeline)")


def split_key(key: str) -> tuple[str, str]:
    """``"finetune/split1-resnet101/rgb"`` -> ``("finetune", "split1-resnet101/rgb")``; ``"decode"`` ->
    ``("decode", "")``."""
    stage, _, variant = key.partition("/")
    return stage, variant


@dataclass(frozen=True)
class KeyParts:
    """A key taken apart: its stage, its scope's split and backbone (None for shared outputs) and the
    variant inside the scope (the stream of finetune, the head name of train-head and refine)."""

    stage: str
    split: int | None = None
    backbone: str | None = None
    name: str = ""


def key_parts(key: str) -> KeyParts:
    stage, rest = split_key(key)
    head, _, name = rest.partition("/")
    parsed = parse_scope(head)
    if parsed is None:
        return KeyParts(stage, None, None, rest)
    return KeyParts(stage, parsed[0], parsed[1], name)


def scope_keys(cache_root: Path, stage: str) -> list[str]:
    """The scopes (``split1-resnet101``, ...) under which ``stage`` has an output folder in the cache: the
    hint when a stage reads a scope that has none."""
    folder = Path(cache_root) / stage
    if not folder.is_dir():
        return []
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and parse_scope(d.name) is not None)


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


def finished_outputs(cache_root: Path, stage: str, split: int = 1, backbone: str = DEFAULT_BACKBONE) -> list[str]:
    """Names of the finished outputs of a per-name ``stage`` (train-head, refine) in one scope, sorted."""
    from pipeline.stage.declare import StageError, read_manifest

    folder = Path(cache_root) / stage / scope(split, backbone)
    names = []
    if folder.is_dir():
        for d in sorted(folder.iterdir()):
            try:
                m = read_manifest(d) if d.is_dir() else None
            except StageError:
                m = None
            if m and m.get("complete"):
                names.append(d.name)
    return names
