"""``train-head``: a temporal head (STFN, STCB, ST-Multiplier or a baseline) on the cached features.

Reads the feature store of ``extract-features`` (``features.zarr`` or ``features.h5``, docs/formats.md),
trains one head (:func:`pipeline.models.heads.create_head`) with :func:`pipeline.training.heads.fit_head` and
evaluates it on the test split. Each head is its own cache output, ``train-head/<name>``, the name derived
from the head's structural options (``stfn-a-avg-bi-n7-s0``, ``tsn-n5-s0``) unless ``--name`` is given, so
heads coexist and changing one head's parameter recomputes only that head.

Protocol ([STFN] §4.2):

\b
- training: N segments, one random cached position per segment, fresh every epoch; RMSProp, learning rate
  1e-4 divided by 10 whenever the validation error stops improving, down to 1e-7; the best validation epoch
  is kept. Validation videos are held out from the training split **by group** (whole groups, per class
  when every group belongs to one class, as UCF101's ``<class>_gNN``), with a fixed hold-out seed so that
  every head and every ``--seed`` sees the same validation videos.
- testing: 5 sequences per video (in every segment, 5 uniformly spaced positions) whose class
  probabilities are averaged (``--test-fusion mean``) or SCI-fused (``sci``, [FstCN] eq. 6).
- views: a store may hold several spatial views per position (``(V, P, views, D)``: the centre crop, or
  TSN's 10 crops). Training and validation use the centre view (``center`` in the store's ``view_names``,
  else view 0); testing fuses the 5 sequences of every view (TSN trains on one crop, tests on all).
- positions: N segments need P >= N cached positions (an error otherwise). With P < 5N a segment has fewer
  than 5 positions and some of the 5 test sequences coincide: the protocol then averages the distinct
  positions with repeats (still uniformly spaced); this is allowed, since Table 4's N = 7, 9 would otherwise
  need P >= 45, and it is logged and recorded in results.json (``distinct_test_sequences``).

Outputs in ``<cache>/train-head/<name>/``: ``best.pt`` (the head's state dict and how to rebuild it,
written atomically; :func:`load_head_checkpoint`), ``results.json`` (top-1, mean class accuracy,
per-class accuracy, confusion matrix, training history), ``test_scores.npz`` (per-video probabilities,
:mod:`pipeline.eval.results`), ``confusion.png``, ``curves.png``.

``pipeline ablate`` (a plain command, :data:`COMMANDS`) runs the grids of [STFN] Tables 1-4 and the
baselines as ``train-head`` outputs (each row cached; re-running recomputes only what changed) and writes
markdown tables and a bar chart to ``<cache>/ablate/`` (a plain folder, not a stage).

Examples:

\b
    pipeline train-head --head stfn --fusion avg --dir bi --segments 7
    pipeline train-head --head tsn --segments 7
    pipeline train-head --head stfn --arch c --seed 1 --test-fusion sci
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from pipeline.io.atomic import write_json as write_json_atomic
from pipeline.stage import Plan, Stage, StageContext, StageError, StageLocked, Upstream, param, \
    params_dict, run_stage
from pipeline.training.heads import NUM_TEST, evaluate, fit_head, group_holdout, predict_views, test_sequences
from pipeline.models.heads import create_head, list_heads, load_head_checkpoint  # noqa: F401
from pipeline.models.stfn import ARCHS, DIRECTIONS, STFN_FUSIONS
from pipeline.eval.results import TestScores, fmt_mean_std, markdown_table, mean_std, save_test_scores
from pipeline.eval.scores import SCORE_FUSIONS, fuse_scores
from pipeline.io.store import FeatureSet, StoreError, read_feature_store

VERSION = "1"
UPSTREAM = "extract-features"
from pipeline.data import STREAMS  # noqa: E402,F401
#: Fixed seed of the validation hold-out: every head and every --seed validates on the same videos.
HOLDOUT_SEED = 0
_STFN_DEFAULTS = {"arch": "a", "fusion": "avg", "dir": "bi", "blocks": 1}
_STCB_DIM_HEADS = ("stcb", "stcb_temporal")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class TrainHeadParams:
    head: str = param("stfn", "Head: stfn, a baseline (rgb, flow, late, tsn, concat), stcb, stcb_temporal or "
                      "stmultiplier.", choices=list_heads())
    arch: str | None = param("a", "STFN architecture (Fig. 4): a, b (no Res-Inc after fusion) or c "
                             "(concatenate, one Res-Inc path).", choices=ARCHS)
    fusion: str | None = param("avg", "STFN fusion G: avg, max, mul (eq. 4-6) or stcb (compact bilinear).",
                               choices=STFN_FUSIONS)
    dir: str | None = param("bi", "STFN fusion direction (Fig. 5): bi, a2m (A->M) or m2a (A<-M).",
                            choices=DIRECTIONS)
    segments: int = param(5, "N segments per video ([STFN] §4.2: 5 by default; Table 4: 3, 5, 7, 9).")
    blocks: int | None = param(1, "STFN: consecutive Res-Inc blocks per path (§4.3).")
    dropout: float = param(0.5, "Dropout before each classifier.")
    flow_weight: float | None = param(None, "late / tsn: weight of the flow scores (default: the head's, "
                                      "late 1, tsn 1.5).")
    stcb_dim: int | None = param(4096, "STCB output dimension (stfn --fusion stcb, stcb, stcb_temporal; "
                                 "[STPN] Table 3: 4096).")
    fused_dim: int | None = param(None, "STFN avg/max/mul with rgb and flow features of different widths: "
                                  "project both to this width first.")
    seed: int = param(0, "Seed of the head's initialisation, the sampled positions and dropout.")
    split: int | None = param(None, "Check that the feature store was extracted for this split "
                              "(default: use the store's split).")
    test_fusion: str = param("mean", "Fusion of the test sequences' scores: mean ([STFN] §4.2) or sci "
                             "([FstCN] eq. 6).", choices=SCORE_FUSIONS)
    num_test: int = param(NUM_TEST, "Test sequences per video ([STFN] §4.2: 5).")
    val_fraction: float = param(0.2, "Fraction of the training videos held out (by group) for validation.")
    lr: float = param(1e-4, "RMSProp initial learning rate ([STFN] §4.2).")
    min_lr: float = param(1e-7, "Learning rate floor: training stops when validation saturates there.")
    patience: int = param(3, "Epochs without validation improvement before the learning rate is divided by 10.")
    batch_size: int = param(32, "Videos per mini-batch.")
    max_epochs: int = param(100, "Hard cap on epochs.")
    device: str = param("auto", "Training device: auto (cuda when available), cpu, cuda, cuda:1, ...",
                        fingerprint=False)
    name: str | None = param(None, "Output name (train-head/<name>); default derived from the head's options, "
                             "e.g. stfn-a-avg-bi-n7-s0.", fingerprint=False)

    def __post_init__(self) -> None:
        # Options that do not apply to the chosen head are dropped (None), so they change neither the
        # fingerprint nor the name; STFN's missing options take the paper's defaults.
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        if self.head == "stfn":
            for k, v in _STFN_DEFAULTS.items():
                if getattr(self, k) is None:
                    set_(k, v)
            if self.arch == "c":  # Fig. 4c: concatenation, a single path; no fusion, no direction
                set_("fusion", None), set_("dir", None), set_("fused_dim", None)
        else:
            for k in ("arch", "fusion", "dir", "blocks", "fused_dim"):
                set_(k, None)
        uses_stcb = self.head in _STCB_DIM_HEADS or (self.head == "stfn" and self.fusion == "stcb")
        if not uses_stcb:
            set_("stcb_dim", None)
        elif self.stcb_dim is None:
            set_("stcb_dim", 4096)
        if self.head == "stfn" and self.fusion == "stcb":
            set_("fused_dim", None)
        if self.head not in ("late", "tsn"):
            set_("flow_weight", None)

    def validate(self) -> None:
        checks = [
            (self.segments >= 1, f"--segments must be >= 1 (got {self.segments})"),
            (self.blocks is None or self.blocks >= 1, f"--blocks must be >= 1 (got {self.blocks})"),
            (0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1) (got {self.dropout})"),
            (self.flow_weight is None or self.flow_weight >= 0, f"--flow-weight must be >= 0 (got {self.flow_weight})"),
            (self.stcb_dim is None or self.stcb_dim >= 1, f"--stcb-dim must be >= 1 (got {self.stcb_dim})"),
            (self.fused_dim is None or self.fused_dim >= 1, f"--fused-dim must be >= 1 (got {self.fused_dim})"),
            (self.num_test >= 1, f"--num-test must be >= 1 (got {self.num_test})"),
            (0.0 < self.val_fraction < 1.0, f"--val-fraction must be in (0, 1) (got {self.val_fraction})"),
            (0 < self.min_lr <= self.lr, f"need 0 < --min-lr <= --lr (got {self.min_lr}, {self.lr})"),
            (self.patience >= 1 and self.batch_size >= 1 and self.max_epochs >= 1,
             "--patience, --batch-size and --max-epochs must be >= 1"),
            (self.name is None or bool(_NAME_RE.match(self.name)),
             f"--name {self.name!r} must be a plain folder name (letters, digits, . _ + -)"),
        ]
        for ok, message in checks:
            if not ok:
                raise StageError(message)


def head_name(p: TrainHeadParams) -> str:
    """The output name: ``--name`` or one derived from the structural options (stfn-a-avg-bi-n7-s0)."""
    if p.name:
        return p.name
    if p.head == "stfn":
        parts = ["stfn", p.arch] + ([p.fusion, p.dir] if p.arch != "c" else [])
        if p.blocks != 1:
            parts.append(f"k{p.blocks}")
    else:
        parts = [p.head]
    if p.flow_weight is not None:
        parts.append(f"w{p.flow_weight:g}")
    if p.stcb_dim is not None and p.stcb_dim != 4096:
        parts.append(f"d{p.stcb_dim}")
    if p.fused_dim is not None:
        parts.append(f"f{p.fused_dim}")
    parts += [f"n{p.segments}", f"s{p.seed}"]
    if p.test_fusion != "mean":
        parts.append(p.test_fusion)
    if p.split is not None:
        parts.append(f"split{p.split}")
    return "-".join(parts)


def head_kwargs(p: TrainHeadParams) -> dict:
    """Keyword options of :func:`create_head` for these parameters."""
    kw: dict = {"dropout": p.dropout}
    if p.head == "stfn":
        kw.update(arch=p.arch, blocks=p.blocks, seed=p.seed)
        if p.arch != "c":
            kw.update(fusion=p.fusion, direction=p.dir)
        if p.fused_dim is not None:
            kw["fused_dim"] = p.fused_dim
    if p.stcb_dim is not None:
        kw["stcb_dim"] = p.stcb_dim
    if p.head in _STCB_DIM_HEADS:
        kw["seed"] = p.seed
    if p.flow_weight is not None:
        kw["flow_weight"] = p.flow_weight
    return kw


# ----------------------------------------------------------------------------------------------------------
# The feature store
# ----------------------------------------------------------------------------------------------------------

def feature_store_file(folder: Path) -> Path:
    """The store an extract-features output folder holds (features.zarr or features.h5)."""
    found = [folder / n for n in ("features.zarr", "features.h5") if (folder / n).exists()]
    if not found:
        raise StageError(f"{folder}: no features.zarr or features.h5 (re-run `pipeline extract-features`)")
    return found[0]


def _stream_shapes(path: Path, streams) -> dict[str, tuple[int, ...]]:
    """Shapes of the stored streams without reading them."""
    from pipeline.io.store import feature_store_shapes

    shapes = feature_store_shapes(path)
    return {s: shapes[s] for s in streams if s in shapes}


_LOADED: dict[tuple, FeatureSet] = {}


def load_features(path: Path) -> FeatureSet:
    """The whole store, read once per process (``ablate`` trains many heads on it); re-read when it changes."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_mtime_ns)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = read_feature_store(path, STREAMS)
    return _LOADED[key]


def holdout_by_group(groups: np.ndarray, labels: np.ndarray, frac: float, seed: int = HOLDOUT_SEED
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices with whole groups held out; per class when every group has one class (so every
    class with 2+ groups is validated and keeps training videos). Classes with one group stay in training."""
    groups, labels = np.asarray(groups).astype(str), np.asarray(labels).astype(np.int64)
    classes_of: dict[str, set] = {}
    for g, y in zip(groups.tolist(), labels.tolist()):
        classes_of.setdefault(g, set()).add(y)
    if all(len(c) == 1 for c in classes_of.values()):
        val = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            if np.unique(groups[idx]).size >= 2:
                val.append(idx[group_holdout(groups[idx], frac, seed + int(c))[1]])
        val = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    else:
        val = group_holdout(groups, frac, seed)[1] if np.unique(groups).size >= 2 else np.zeros(0, np.int64)
    if val.size == 0:
        raise StageError("cannot hold out validation videos by group: no class has 2 or more groups in the "
                         "training split (the store's `groups` array)")
    return np.setdiff1d(np.arange(labels.size), val), val


def _groups(fs_groups: np.ndarray, video_ids: np.ndarray) -> np.ndarray:
    """The store's groups, a video being its own group where none is recorded."""
    groups = np.asarray(fs_groups).astype(str)
    return np.where(groups == "", np.asarray(video_ids).astype(str), groups)


# ----------------------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------------------

def plan(params: TrainHeadParams, upstream: Upstream) -> Plan:
    p = params
    path = feature_store_file(upstream.dir(UPSTREAM))
    try:
        meta = read_feature_store(path, streams=[])
    except (StoreError, KeyError, OSError) as e:
        raise StageError(f"{path}: cannot read the feature store ({e})") from None
    stored = list(meta.attrs.get("streams", []))
    missing = [s for s in STREAMS if s not in stored]
    if missing:
        raise StageError(f"{path}: feature store has streams {stored}; train-head needs rgb and flow "
                         f"(missing {missing}); re-run extract-features with both streams")
    shapes = _stream_shapes(path, STREAMS)
    v = len(meta.video_ids)
    for s, shape in shapes.items():
        if len(shape) != 4 or shape[0] != v:
            raise StageError(f"{path}: stream {s!r} has shape {shape}, expected (V={v}, P, views, D)")
    (_, pa, va, da), (_, pm, vm, dm) = shapes["rgb"], shapes["flow"]
    if (pa, va) != (pm, vm):
        raise StageError(f"{path}: rgb {shapes['rgb']} and flow {shapes['flow']} differ in positions or views")
    n, P = p.segments, pa
    if P < n:
        raise StageError(f"{path}: {P} cached positions per video cannot be split into --segments {n} "
                         f"(need at least {n}); re-run extract-features with more positions")
    stored_split = meta.attrs.get("split_id")
    if p.split is not None and stored_split is not None and str(stored_split) != str(p.split):
        raise StageError(f"{path}: features were extracted for split {stored_split}, --split {p.split} "
                         f"asked; re-run extract-features --split {p.split}")
    view_names = list(meta.attrs.get("view_names") or [])
    train_view = view_names.index("center") if "center" in view_names else 0
    split = np.asarray(meta.split).astype(str)
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    if train.size == 0 or test.size == 0:
        raise StageError(f"{path}: {train.size} training and {test.size} test videos; both splits are needed")
    c = len(meta.class_names)
    labels = np.asarray(meta.labels)
    if labels.min() < 0 or labels.max() >= c:
        raise StageError(f"{path}: labels outside [0, {c})")
    untrained = sorted(set(labels[test].tolist()) - set(labels[train].tolist()))
    if untrained:
        raise StageError(f"{path}: test classes absent from training: {[meta.class_names[i] for i in untrained][:5]}")
    holdout_by_group(_groups(meta.groups[train], meta.video_ids[train]), labels[train], p.val_fraction)
    try:  # the head validates its own widths (d divisible by 4 for Res-Inc, equal widths for avg/max/mul)
        create_head(p.head, num_classes=c, rgb_dim=da, flow_dim=dm, num_segments=n, **head_kwargs(p))
    except (ValueError, TypeError) as e:
        hint = " (--fused-dim D on the command line)" if "fused_dim" in str(e) else ""
        raise StageError(f"{path}: head {p.head} on rgb {da}-d / flow {dm}-d features: {e}{hint}") from None
    distinct = len({tuple(s) for s in test_sequences(P, n, p.num_test).tolist()})
    info = {"path": str(path), "P": P, "views": va, "train_view": train_view, "rgb_dim": da, "flow_dim": dm, "num_classes": c,
            "train": int(train.size), "test": int(test.size), "distinct_test_sequences": distinct}
    describe = (f"{p.head} on {train.size} train / {test.size} test videos, {c} classes, rgb {da}-d, "
                f"flow {dm}-d, P={P}, N={n}, {va} view(s)")
    return Plan("", info, describe)


def _tensors(fs: FeatureSet, idx: np.ndarray, view: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, P, D) float32 of one view, or (V, P, views, D) for view=None."""
    out = []
    for s in STREAMS:
        a = fs.streams[s][idx]
        out.append(torch.from_numpy(np.ascontiguousarray(a[:, :, view] if view is not None else a,
                                                         dtype=np.float32)))
    return out[0], out[1]


def _atomic_torch_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run(ctx: StageContext, plan: Plan) -> dict:
    from pipeline.eval.plots import confusion_matrix_plot, training_curves

    p: TrainHeadParams = ctx.params
    info = plan.data
    name = ctx.dir.name
    fs = load_features(Path(info["path"]))
    split = np.asarray(fs.split).astype(str)
    train_all, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    tr, va = holdout_by_group(_groups(fs.groups[train_all], fs.video_ids[train_all]), fs.labels[train_all],
                              p.val_fraction)
    tr, va = train_all[tr], train_all[va]
    labels = torch.from_numpy(np.asarray(fs.labels, dtype=np.int64))
    n = p.segments
    if info["distinct_test_sequences"] < p.num_test:
        ctx.log.warning("%d positions per video and N=%d: segments hold fewer than %d positions, so only %d of "
                        "the %d test sequences are distinct (repeats are averaged in)", info["P"], n,
                        p.num_test, info["distinct_test_sequences"], p.num_test)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if p.device == "auto" else p.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        head = create_head(p.head, num_classes=info["num_classes"], rgb_dim=info["rgb_dim"],
                           flow_dim=info["flow_dim"], num_segments=n, **head_kwargs(p))
    bar = ctx.progress(p.max_epochs, f"train-head {name}", unit="epoch")

    def on_epoch(rec: dict) -> None:
        bar.update(1)
        bar.set_postfix_str(f"lr {rec['lr']:.0e} loss {rec['train_loss']:.3f} val err {rec['val_error']:.3f}")
        ctx.log.debug("epoch %(epoch)d lr %(lr).0e train loss %(train_loss).4f val loss %(val_loss).4f "
                      "val error %(val_error).4f", rec)

    t0 = time.perf_counter()
    view = info["train_view"]
    history = fit_head(head, (*_tensors(fs, tr, view), labels[tr]), (*_tensors(fs, va, view), labels[va]),
                       num_segments=n, lr=p.lr, min_lr=p.min_lr, patience=p.patience, batch_size=p.batch_size,
                       max_epochs=p.max_epochs, num_test=p.num_test, device=device, seed=p.seed, log=on_epoch)
    bar.close()
    fit_seconds = time.perf_counter() - t0

    # Test: every view's num_test sequences, fused (mean or SCI) into one score per video.
    rgb_test, flow_test = _tensors(fs, test, None)
    views = torch.cat([predict_views(head, rgb_test[:, :, k], flow_test[:, :, k], n, p.num_test)
                       for k in range(rgb_test.shape[2])], dim=1)
    scores = fuse_scores(views, p.test_fusion).numpy()
    class_names = [str(c) for c in fs.class_names]
    ts = TestScores(scores, fs.video_ids[test], fs.labels[test], class_names)
    ev = evaluate(ts.scores, ts.labels, class_names)

    kwargs = head_kwargs(p)
    _atomic_torch_save({
        "model": {k: v.detach().cpu() for k, v in head.state_dict().items()}, "head": p.head,
        "head_kwargs": kwargs, "num_classes": info["num_classes"], "rgb_dim": info["rgb_dim"],
        "flow_dim": info["flow_dim"], "num_segments": n, "classes": class_names, "epoch": history.best_epoch,
        "params": params_dict(p), "metrics": {"top1": ev.top1, "mean_class_accuracy": ev.mean_class_accuracy},
    }, ctx.dir / "best.pt")
    save_test_scores(ctx.dir / "test_scores.npz", ts)
    results = {
        "name": name, "head": p.head, "head_kwargs": kwargs, "params": params_dict(p), **ev.as_dict(),
        "videos": {"train": int(tr.size), "val": int(va.size), "test": int(test.size)},
        "positions": info["P"], "views": info["views"], "segments": n, "num_test": p.num_test,
        "distinct_test_sequences": info["distinct_test_sequences"], "test_fusion": p.test_fusion,
        "device": str(device), "fit_seconds": fit_seconds, "history": history.as_dict(),
    }
    write_json_atomic(ctx.dir / "results.json", results)
    title = f"train-head/{name}: top-1 {100 * ev.top1:.1f}%"
    confusion_matrix_plot(ev.confusion, class_names, ctx.dir / "confusion.png", title=title)
    training_curves([{**r, "val_acc": 1.0 - r["val_error"]} for r in history.epochs], ctx.dir / "curves.png",
                    title=f"train-head/{name}")
    line = (f"train-head/{name}: top-1 {100 * ev.top1:.1f}%, mean class accuracy "
            f"{100 * ev.mean_class_accuracy:.1f}% on {test.size} test videos ({len(history.epochs)} epochs, "
            f"best {history.best_epoch}, {fit_seconds:.1f} s on {device})")
    ctx.log.info(line)
    return {"line": line, "top1": ev.top1, "mean_class_accuracy": ev.mean_class_accuracy,
            "epochs": len(history.epochs), "best_epoch": history.best_epoch, "fit_seconds": fit_seconds,
            "test_videos": int(test.size)}


STAGE = Stage(
    name="train-head", version=VERSION, params_type=TrainHeadParams, plan=plan, run=run,
    upstream=lambda params: (UPSTREAM,), key=lambda params: f"train-head/{head_name(params)}",
    help="Train a temporal head (STFN, STCB, baselines) on the cached features and evaluate it.",
)


# ----------------------------------------------------------------------------------------------------------
# ablate: the grids of [STFN] Tables 1-4 and the baselines, each row a cached train-head output
# ----------------------------------------------------------------------------------------------------------

#: grid -> [(file stem, title, [(row label, option overrides)])]; every row starts from STFN (a, avg, bi)
#: at the configured N ([STFN] §4.2: "5 segments, average fusion, and bi-directional fusion as default").
GRIDS: dict[str, list[tuple[str, str, list[tuple[str, dict]]]]] = {
    "tables": [
        ("table1_architecture", "Table 1: STFN architectures (Fig. 4)",
         [(f"arch {a}", {"arch": a}) for a in ARCHS]),
        ("table2_fusion", "Table 2: fusion operations (eq. 4-6, + STCB)",
         [(f"fusion {f}", {"fusion": f}) for f in ("avg", "max", "mul", "stcb")]),
        ("table3_direction", "Table 3: fusion directions (Fig. 5)",
         [(label, {"dir": d}) for label, d in (("A<->M (bi)", "bi"), ("A->M (a2m)", "a2m"),
                                                ("A<-M (m2a)", "m2a"))]),
        ("table4_segments", "Table 4: number of segments",
         [(f"N = {k}", {"segments": k}) for k in (3, 5, 7, 9)]),
        ("baselines", "Baselines and other fusion heads",
         [(h, {"head": h}) for h in ("rgb", "flow", "late", "tsn", "concat", "stcb", "stmultiplier")]
         + [("stfn (a, avg, bi)", {})]),
    ],
    "reduced": [
        ("table1_architecture", "Table 1: STFN architectures (Fig. 4)",
         [("arch a", {"arch": "a"}), ("arch c", {"arch": "c"})]),
        ("table2_fusion", "Table 2: fusion operations (eq. 4-6)",
         [("fusion avg", {"fusion": "avg"}), ("fusion mul", {"fusion": "mul"})]),
        ("table3_direction", "Table 3: fusion directions (Fig. 5)",
         [("A<->M (bi)", {"dir": "bi"}), ("A<-M (m2a)", {"dir": "m2a"})]),
        ("table4_segments", "Table 4: number of segments",
         [(f"N = {k}", {"segments": k}) for k in (3, 5)]),
        ("baselines", "Baselines",
         [(h, {"head": h}) for h in ("rgb", "flow", "tsn")] + [("stfn (a, avg, bi)", {})]),
    ],
}


@dataclass(frozen=True)
class AblateParams:
    grid: str = param("tables", "Which grids: tables ([STFN] Tables 1-4 and every baseline) or reduced "
                      "(two settings per table; for the demo).", choices=tuple(GRIDS))
    seeds: int = param(1, "Train every row with seeds 0..K-1 and report mean ± std.")

    def validate(self) -> None:
        if self.seeds < 1:
            raise StageError(f"--seeds must be >= 1 (got {self.seeds})")


def ablation_rows(base: TrainHeadParams, grid: str, seeds: int) -> list[tuple[str, str, list[tuple[str, list]]]]:
    """[(stem, title, [(label, [TrainHeadParams per seed])])] for ``grid``; each row starts from ``base``'s
    training settings with the head reset to STFN (a, avg, bi, 1 block)."""
    reset = {"head": "stfn", "arch": "a", "fusion": "avg", "dir": "bi", "blocks": 1, "name": None,
             "flow_weight": None, "fused_dim": base.fused_dim, "stcb_dim": None}
    out = []
    for stem, title, rows in GRIDS[grid]:
        out.append((stem, title, [(label, [dataclasses.replace(base, **{**reset, **over, "seed": s})
                                           for s in range(seeds)]) for label, over in rows]))
    return out


def run_ablation(base: TrainHeadParams, cache_root: Path, grid: str = "tables", seeds: int = 1,
                 echo=lambda s: None) -> dict:
    """Train every row of ``grid`` (cached train-head outputs) and write the tables and the chart to
    ``<cache_root>/ablate/``. Returns {stem: [row dicts]}."""
    from pipeline.eval.plots import bar_chart

    cache_root = Path(cache_root)
    tables = ablation_rows(base, grid, seeds)
    done: dict[str, dict] = {}
    total = len({head_name(p) for _, _, rows in tables for _, ps in rows for p in ps})
    for _, _, rows in tables:
        for _, ps in rows:
            for p in ps:
                key = f"train-head/{head_name(p)}"
                if key in done:
                    continue
                try:
                    res = run_stage(STAGE, p, cache_root)
                except StageLocked:
                    raise
                except StageError as e:
                    done[key] = {"skipped": str(e)}
                    echo(f"[{len(done)}/{total}] {key}: skipped: {e}")
                    continue
                r = json.loads((cache_root / key / "results.json").read_text())
                done[key] = {"top1": r["top1"], "mean_class_accuracy": r["mean_class_accuracy"]}
                echo(f"[{len(done)}/{total}] {res.message}")
    out_dir = cache_root / "ablate"
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, list] = {}
    chart, chart_err = {}, {}
    for stem, title, rows in tables:
        body, recs = [], []
        for label, ps in rows:
            keys = [f"train-head/{head_name(p)}" for p in ps]
            res = [done[k] for k in keys]
            skipped = [r["skipped"] for r in res if "skipped" in r]
            rec = {"label": label, "keys": keys, "params": params_dict(ps[0])}
            if skipped:
                rec["skipped"] = skipped[0]
                body.append([label, ps[0].head, "skipped", "skipped", str(len(ps)), skipped[0].replace("|", "/")])
            else:
                top1 = [r["top1"] for r in res]
                mca = [r["mean_class_accuracy"] for r in res]
                rec.update(top1=top1, mean_class_accuracy=mca, top1_mean_std=mean_std(top1),
                           mean_class_accuracy_mean_std=mean_std(mca))
                body.append([label, ps[0].head, fmt_mean_std(top1), fmt_mean_std(mca), str(len(ps)),
                             ", ".join(k.split("/", 1)[1] for k in keys)])
                bar = keys[0].split("/", 1)[1].rsplit("-s0", 1)[0]
                chart[bar], chart_err[bar] = rec["top1_mean_std"]
            recs.append(rec)
        std_note = f" (mean ± sample std over {seeds} seeds)" if seeds > 1 else ""
        text = (f"# {title}\n\nTest-split accuracy (%){std_note}, one row per setting; every other option as "
                f"`[train-head]` with STFN (a, avg, bi). Grid `{grid}`.\n\n"
                + markdown_table(["setting", "head", "top-1 (%)", "mean class acc. (%)", "seeds", "train-head"],
                                 body, "llrrrl"))
        tmp = out_dir / f".tmp-{stem}.md"
        tmp.write_text(text)
        os.replace(tmp, out_dir / f"{stem}.md")
        report[stem] = recs
    chart_path = out_dir / "ablate.png"
    if chart:
        bar_chart(chart, chart_path, errors=chart_err if seeds > 1 else None,
                  title=f"ablate ({grid} grid, {seeds} seed{'s' if seeds > 1 else ''}): top-1")
    write_json_atomic(out_dir / "ablate.json", {"grid": grid, "seeds": seeds, "tables": report})
    return report


@click.command("ablate")
@click.option("--grid", type=click.Choice(list(GRIDS)), default=None,
              help="tables: [STFN] Tables 1-4 and every baseline; reduced: two settings per table. "
                   "[default: tables]")
@click.option("--seeds", type=int, default=None, help="Seeds per row (mean ± std when > 1). [default: 1]")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="TOML config: [ablate] (grid, seeds) and [train-head] (training settings of every row).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@click.option("-v", "--verbose", is_flag=True, default=False, help="Debug logging.")
def ablate_command(grid, seeds, config_path, cache_dir, verbose):
    """[STFN]'s ablations (Tables 1-4) and the baselines on the cached features.

    Every row is a `train-head` output (train-head/<name>), so re-running recomputes only the rows whose
    options or features changed. Rows that do not fit the feature store (e.g. N = 9 with fewer than 9 cached
    positions) are reported as skipped with the reason. Writes <cache>/ablate/table1_architecture.md,
    table2_fusion.md, table3_direction.md, table4_segments.md, baselines.md, ablate.png and ablate.json.

    \b
    Examples:
        pipeline ablate
        pipeline ablate --grid reduced --seeds 3 --config configs/demo.toml
    """
    from pipeline.stage import config as cfg
    from stages.cli import config_tables, resolve_cache_dir, setup_logging as _setup_logging

    _setup_logging(verbose)
    try:
        conf = cfg.load_config(config_path, config_tables())
        ap = cfg.build_params(AblateParams, conf, "ablate", {"grid": grid, "seeds": seeds}, config_path=config_path)
        base = cfg.build_params(TrainHeadParams, conf, "train-head", {}, config_path=config_path)
        root = resolve_cache_dir(cache_dir, conf)
        report = run_ablation(base, root, ap.grid, ap.seeds, echo=click.echo)
    except (StageError, cfg.ConfigError) as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    skipped = sum("skipped" in r for recs in report.values() for r in recs)
    click.echo(f"ablate: {len(report)} tables in {root / 'ablate'}"
               + (f" ({skipped} row(s) skipped, reasons in the tables)" if skipped else ""))
    for stem in report:
        click.echo(f"  {root / 'ablate' / (stem + '.md')}")
    click.echo(f"  {root / 'ablate' / 'ablate.png'}")


COMMANDS = [ablate_command]
