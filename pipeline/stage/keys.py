"""The cache layout: stage names, output keys, scopes and every file name inside a stage folder.

The one home of these names: every other module (the runner, ``pipeline.io.artifacts``, the stages, the
training loop) takes them from here. This module imports no other module of the pipeline.

Every stage's output lives in ``<cache>/<key>/``. ``decode`` and ``extract-flow`` are shared by every split
and backbone (one decode serves UCF101's three splits, and the ResNet-101 and Inception-V3 configs share it).
Every later stage's output is per *scope*: the split and the backbone, ``split<k>-<backbone>`` (:func:`scope`),
so the models of split 1 and split 2, or of two backbones, exist side by side in one cache. An end-to-end
network whose two streams have different backbones (``train-net --rgb-arch resnet50 --flow-arch resnet152``)
lives in the scope of the pair, ``split1-resnet50+resnet152`` (:func:`pair_backbone`).

| stage            | key                                      | what is inside                                  |
|------------------|------------------------------------------|-------------------------------------------------|
| decode           | ``decode``                               | ``frames/`` (one container per video), ``videos.json`` |
| extract-flow     | ``extract-flow``                         | ``flow/`` (one container per video)             |
| finetune         | ``finetune/<scope>/<stream>``            | ``best.pt``, ``last.pt``, ``test_scores.npz``, plots |
| extract-features | ``extract-features/<scope>``             | ``features.zarr`` and/or ``features.h5``        |
| train-head       | ``train-head/<scope>/<name>``            | ``best.pt``, ``results.json``, ``test_scores.npz`` |
| refine           | ``refine/<scope>/<name>``                | ``best.pt``, ``last.pt``, ``results.json``, ``test_scores.npz`` |
| train-net        | ``train-net/<scope>/<name>``             | ``best.pt``, ``last.pt``, ``results.json``, ``test_scores.npz`` |
| evaluate         | ``evaluate/<scope>``, ``evaluate/splits1-2-3-<backbone>`` | ``results.md``, ``results.json``, plots |

Beside those, every stage folder holds the run's own files (:data:`MANIFEST`, :data:`RUN_INFO`, the journal,
:data:`LOG`); the lock is ``<cache>/<key>.lock``, the kept runs ``<cache>/.runs/<key>/<fingerprint>/``
(:mod:`pipeline.stage.runner`, :mod:`pipeline.stage.runcache`) and a run folder being deleted is first renamed
into ``<cache>/.trash/`` (never listed, never restored; ``pipeline gc --yes`` empties it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

#: Version of the cache layout itself (manifest and journal schema), checked when reading a cache folder.
CACHE_FORMAT = 1

#: Stage names; a key is the name, or ``<name>/<scope>[/<variant>]`` for the per-scope stages.
DECODE = "decode"
FLOW = "extract-flow"
FINETUNE = "finetune"
FEATURES = "extract-features"
TRAIN_HEAD = "train-head"
REFINE = "refine"
TRAIN_NET = "train-net"
EVALUATE = "evaluate"
#: ``pipeline ablate``'s tables (a command, not a stage): ``<cache>/ablate/<scope>/``, with the rows of every
#: table (``ablate.json``), a bar chart (``ablate.png``) and one ``<table>.md`` each.
ABLATE = "ablate"
ABLATE_JSON = "ablate.json"
ABLATE_CHART = "ablate.png"
#: ``pipeline report``'s page (a command, not a stage): ``<cache>/report/index.html``.
REPORT = "report"
REPORT_PAGE = "index.html"

#: The stages whose outputs are per scope (split and backbone).
SCOPED = (FINETUNE, FEATURES, TRAIN_HEAD, REFINE, TRAIN_NET, EVALUATE)

# Files of every run (written by pipeline.stage.runner).
MANIFEST = "manifest.json"      # a finished run: fingerprint, parameters, upstream, counts (pipeline.stage.manifest)
RUN_INFO = "run.json"           # written when a run starts: its fingerprint and parameters
JOURNAL = "journal.jsonl"       # rank 0's per-video journal; rank R > 0 writes journal.rank<R>.jsonl
JOURNAL_GLOB = "journal*.jsonl"
LOG = "log.txt"
LOCK_SUFFIX = ".lock"           # <cache>/<key>.lock, beside the folder
RUNS_DIR = ".runs"              # <cache>/.runs/<key>/<fingerprint>/: the kept runs
TRASH_DIR = ".trash"            # <cache>/.trash/<unique>: run folders renamed here, then deleted
DELETING_PREFIX = ".deleting-"  # <folder's parent>/.deleting-<name>-<pid>: the same, where .trash is on another disk

# A stage's outputs.
FRAMES_DIR = "frames"           # decode: one container per video
FLOW_DIR = "flow"               # extract-flow: one container per video
TABLE = "videos.json"           # decode: the video table (pipeline.data.table)
FEATURE_FILES = {"zarr": "features.zarr", "h5": "features.h5"}  # extract-features, by store kind
BEST = "best.pt"                # the checkpoint of the best validation epoch (finetune, train-head, refine, train-net)
LAST = "last.pt"                # the checkpoint a killed run resumes from (finetune, refine, train-net)
HISTORY = "history.csv"         # one row per epoch
CURVES = "curves.png"
CONFUSION = "confusion.png"
TENSORBOARD_DIR = "tensorboard"
SCORES = "test_scores.npz"      # per-video test scores (pipeline.eval.results)
RESULTS = "results.json"
RESULTS_MD = "results.md"       # evaluate's table


#: Files a finished run of each stage always holds besides its per-video stores (a kept run missing one is not
#: restored as finished: :mod:`pipeline.stage.integrity`).
REQUIRED_FILES = {
    DECODE: (TABLE,),
    FINETUNE: (BEST,),
    TRAIN_HEAD: (BEST, RESULTS),
    REFINE: (BEST, RESULTS),
    EVALUATE: (RESULTS,),
}
#: The per-video store folder of each stage that has one.
VIDEO_STORE_DIRS = {DECODE: FRAMES_DIR, FLOW: FLOW_DIR}


def journal_name(rank: int) -> str:
    """The journal file of ``rank``: ``journal.jsonl`` for rank 0, ``journal.rank<R>.jsonl`` otherwise."""
    return JOURNAL if rank == 0 else f"journal.rank{rank}.jsonl"


def lock_path(cache_root: Path, key: str) -> Path:
    """``<cache>/<key>.lock``: one run of a key at a time, whatever its fingerprint."""
    return Path(cache_root) / f"{key}{LOCK_SUFFIX}"


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


def net_key(name: str, split: int = 1, backbone: str = DEFAULT_BACKBONE) -> str:
    """``train-net/split1-resnet18/stmult-s0``: an end-to-end network's output."""
    return f"{TRAIN_NET}/{scope(split, backbone)}/{name}"


def pair_backbone(rgb_arch: str, flow_arch: str) -> str:
    """The backbone part of the scope of a two-stream network: the arch when both streams share it
    (``resnet18``), else ``<rgb>+<flow>`` (``resnet50+resnet152``, [ST-Mult] §5.3's best pair)."""
    return rgb_arch if rgb_arch == flow_arch else f"{rgb_arch}+{flow_arch}"


def evaluate_key(splits: Sequence[int] = (1,), backbone: str = DEFAULT_BACKBONE) -> str:
    """``evaluate/split1-resnet101`` for one split; ``evaluate/splits1-2-3-resnet101`` across several."""
    splits = [int(s) for s in splits]
    if len(splits) == 1:
        return f"{EVALUATE}/{scope(splits[0], backbone)}"
    return f"{EVALUATE}/splits{'-'.join(map(str, splits))}-{backbone}"


def key_depth(stage: str) -> int:
    """How many path parts a key of ``stage`` has: 3 for ``finetune/<scope>/<stream>``, ``train-head`` and
    ``refine`` (``<scope>/<name>``), 2 for ``extract-features/<scope>`` and ``evaluate/<scope>``, 1 otherwise.
    (A kept run that lost its run.json and manifest is found by this depth under ``.runs/``.)"""
    return {FINETUNE: 3, TRAIN_HEAD: 3, REFINE: 3, FEATURES: 2, EVALUATE: 2}.get(stage, 1)


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


def scope_keys(cache_root: Path, stage: str) -> list[str]:
    """The scopes (``split1-resnet101``, ...) under which ``stage`` has an output folder in the cache: the
    hint when a stage reads a scope that has none."""
    folder = Path(cache_root) / stage
    if not folder.is_dir():
        return []
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and parse_scope(d.name) is not None)
