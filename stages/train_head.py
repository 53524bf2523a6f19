"""Train one temporal head (STFN, STCB, the ST-Multiplier approximation or a baseline) on the cached features
and test it.

Fits on the store's "train" videos, early-stops on its "val" videos (the hold-out recorded by decode) and
tests on "test" ([STFN] §4.2). Each head is its own output, train-head/<name>, named after its effective
options; docs/train-head.md describes the protocol and the outputs.

\b
Examples:
    pipeline train-head --head stfn --fusion avg --direction bi --segments 7
    pipeline train-head --head tsn --segments 7
    pipeline train-head --head stfn --arch c --seed 1 --test-fusion sci
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import dist
from pipeline.streams import STREAMS
from pipeline.eval.metrics import accuracy_metrics
from pipeline.eval.results import TestScores, save_test_scores
from pipeline.eval.scores import SCORE_FUSIONS
from pipeline.io import artifacts
from pipeline.io.atomic import save_checkpoint, write_json
from pipeline.io.store import StoreError, read_feature_store
from pipeline.models.heads import (DEFAULT_HEAD, DEFAULT_SEGMENTS, HEADS, HEAD_OPTIONS, HeadOptionError, create_head,
                                   head_kwargs, head_options, head_output_name, list_heads)
from pipeline.models.stfn import ARCHS, DIRECTIONS, STFN_FUSIONS
from pipeline.stage import Plan, Stage, StageContext, StageError, Upstream, digest, param, params_dict
from pipeline.stage.validate import option_name
from pipeline.training.tensorboard import EpochScalars, TensorBoardMissing
from pipeline.training.tensorboard import check_available as check_tensorboard
from pipeline.data.sampling import NUM_TEST, eval_sequences
from pipeline.data.feature_dataset import FeatureDataset
from pipeline.memory import format_size, memory_budget, size_problem
from pipeline.training.heads import (NonFiniteLoss, eval_scores, fit_head, load_array, nonfinite_videos,
                                     split_indices, stream_shapes)

VERSION = "2"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def _folder_name(name: str) -> str | None:
    return None if _NAME_RE.match(name) else "must be a plain folder name (letters, digits, . _ + -)"


def _head_option(option: str, help: str, **kw):
    """A head option: None = not given (the head's default applies, pipeline.models.heads.HEADS). Its
    effective value enters the fingerprint through the plan, so giving a default changes nothing."""
    defaults = {}
    for head, spec in HEADS.items():
        if spec.options.get(option) is not None:
            defaults.setdefault(f"{spec.options[option]:g}" if isinstance(spec.options[option], float)
                                else str(spec.options[option]), []).append(head)
    text = "; ".join(f"{'/'.join(hs) if len(hs) < len(HEADS) else 'every head'} {v}" for v, hs in defaults.items())
    return param(None, f"{help} (head default: {text})" if text else help, fingerprint=False, **kw)


@dataclass(frozen=True)
class TrainHeadParams:
    head: str = param(DEFAULT_HEAD, "Head: stfn, stcb, stcb_temporal, stmultiplier (a pooled-feature approximation "
                      "of [ST-Mult]; the network: train-net) or a baseline (rgb, flow, late, tsn, concat).",
                      choices=list_heads())
    arch: str | None = _head_option("arch", "STFN architecture, Fig. 4: a, b or c.", choices=ARCHS)
    fusion: str | None = _head_option("fusion", "STFN fusion G: avg, max, mul (eq. 4-6) or stcb.",
                                      choices=STFN_FUSIONS)
    direction: str | None = _head_option("direction", "STFN fusion direction, Fig. 5: bi, a2m or m2a.",
                                         choices=DIRECTIONS, aliases=("--dir",))
    blocks: int | None = _head_option("blocks", "STFN Res-Inc blocks per path (§4.3).", min=1)
    fused_dim: int | None = _head_option("fused_dim", "STFN avg/max/mul on rgb and flow of different widths: "
                                         "project both to this width.", min=1)
    stcb_dim: int | None = _head_option("stcb_dim", "STCB output width ([STPN] Table 3).", min=1)
    flow_weight: float | None = _head_option("flow_weight", "Weight of the flow scores.", min=0.0)
    dropout: float | None = _head_option("dropout", "Dropout before each classifier.", min=0.0, max=1.0,
                                         max_exclusive=True)
    segments: int = param(DEFAULT_SEGMENTS, "N segments per video ([STFN] §4.2; Table 4: 3, 5, 7, 9).", min=1)
    seed: int = param(0, "Seed of the head's initialisation, the sampled positions and dropout.")
    split: int = param(1, "Split of the features (extract-features --split) the head trains and tests on.",
                       scope="split", min=1)
    backbone: str = param(artifacts.DEFAULT_BACKBONE, "Backbone of the features (extract-features --arch).",
                          scope="backbone")
    test_fusion: str = param("mean", "Fusion of the test sequences' scores: mean ([STFN] §4.2) or sci "
                             "([FstCN] eq. 6).", choices=SCORE_FUSIONS)
    num_test: int = param(NUM_TEST, "Test sequences per video ([STFN] §4.2).", min=1)
    lr: float = param(1e-4, "RMSProp initial learning rate ([STFN] §4.2).", min=0.0, min_exclusive=True)
    min_lr: float = param(1e-7, "Learning-rate floor; training stops when validation saturates there.", min=0.0,
                          min_exclusive=True)
    patience: int = param(3, "Epochs without validation improvement before the learning rate is divided by 10.",
                          min=1)
    batch_size: int = param(32, "Videos per mini-batch.", min=1)
    max_epochs: int = param(100, "Hard cap on epochs.", min=1)
    device: str = param("auto", "Training device: auto, cpu, cuda, cuda:1, ...", fingerprint=False)
    max_memory: str = param("auto", "Features held in memory at most (2G, 512M, ...; auto: half the available "
                            "memory); beyond it they are read from the store as needed, with the same results.",
                            fingerprint=False, check=size_problem)
    tensorboard: bool = param(False, "Write per-epoch loss, error and lr for TensorBoard to <output>/tensorboard/.",
                              fingerprint=False)
    name: str | None = param(None, "Output name (train-head/<name>); default derived from the head's options.",
                             fingerprint=False, check=_folder_name)

    def validate(self) -> None:
        """The checks across parameters (each parameter's own are declared with it)."""
        if self.min_lr > self.lr:
            raise StageError(f"need --min-lr <= --lr (got {self.min_lr}, {self.lr})")
        effective_options(self)


def given_options(p: TrainHeadParams) -> dict:
    """The head options given (not None) in ``p``."""
    return {k: getattr(p, k) for k in HEAD_OPTIONS if getattr(p, k) is not None}


def effective_options(p: TrainHeadParams) -> dict:
    """The head's defaults updated with the given options; an option that does not apply is a StageError."""
    try:
        return head_options(p.head, given_options(p))
    except HeadOptionError as e:
        raise StageError(f"{option_name(e.option)}: {e}") from None


def head_name(p: TrainHeadParams) -> str:
    """The output name: ``--name`` or :func:`pipeline.models.heads.head_output_name` of the options."""
    if p.name:
        return p.name
    effective_options(p)  # the clear error first
    return head_output_name(p.head, given_options(p), segments=p.segments, seed=p.seed,
                            test_fusion=p.test_fusion)


def _upstream_key(p: TrainHeadParams) -> str:
    return artifacts.features_key(p.split, p.backbone)


def head_key(p: TrainHeadParams) -> str:
    """This head's output key: ``train-head/<split>-<backbone>/<name>``."""
    return artifacts.head_key(head_name(p), p.split, p.backbone)


def make_head(p: TrainHeadParams, options: dict, *, num_classes: int, rgb_dim: int, flow_dim: int):
    """The head of ``p`` with effective ``options`` (:func:`effective_options`): what plan checks, run trains."""
    return create_head(p.head, num_classes=num_classes, rgb_dim=rgb_dim, flow_dim=flow_dim,
                       num_segments=p.segments, **head_kwargs(p.head, options, p.seed))


def plan(params: TrainHeadParams, upstream: Upstream) -> Plan:
    p = params
    options = effective_options(p)
    if p.tensorboard:
        try:
            check_tensorboard()
        except TensorBoardMissing as e:
            raise StageError(str(e)) from None
    try:
        path = artifacts.feature_store_file(upstream.dir(_upstream_key(p)))
        meta = read_feature_store(path, streams=[])
    except artifacts.ArtifactError as e:
        raise StageError(str(e)) from None
    except (StoreError, KeyError, OSError) as e:
        raise StageError(f"{path}: cannot read the feature store ({e})") from None
    stored = list(meta.attrs.get("streams", []))
    missing = [s for s in STREAMS if s not in stored]
    if missing:
        raise StageError(f"{path}: feature store has streams {stored}; train-head needs rgb and flow "
                         f"(missing {missing}); re-run extract-features with both streams")
    shapes = stream_shapes(path, STREAMS)
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
    if stored_split is not None and str(stored_split) != str(p.split):
        raise StageError(f"{path}: features were extracted for split {stored_split}, --split {p.split} "
                         f"asked: a head would be tested on videos its backbones were trained on")
    view_names = list(meta.attrs.get("view_names") or [])
    train_view = view_names.index("center") if "center" in view_names else 0
    try:
        parts = split_indices(meta.split, str(path))
    except ValueError as e:
        raise StageError(str(e)) from None
    c = len(meta.class_names)
    labels = np.asarray(meta.labels)
    if labels.min() < 0 or labels.max() >= c:
        raise StageError(f"{path}: labels outside [0, {c})")
    untrained = sorted(set(labels[parts["test"]].tolist()) - set(labels[parts["train"]].tolist()))
    if untrained:
        raise StageError(f"{path}: test classes absent from training: {[meta.class_names[i] for i in untrained][:5]}")
    try:  # the head validates its own widths (d divisible by 4 for Res-Inc, equal widths for avg/max/mul)
        make_head(p, options, num_classes=c, rgb_dim=da, flow_dim=dm)
    except (ValueError, TypeError) as e:
        hint = " (--fused-dim D on the command line)" if "fused_dim" in str(e) else ""
        raise StageError(f"{path}: head {p.head} on rgb {da}-d / flow {dm}-d features: {e}{hint}") from None
    distinct = len({tuple(s) for s in eval_sequences(P, n, p.num_test).tolist()})
    info = {"path": str(path), "P": P, "views": va, "train_view": train_view, "rgb_dim": da, "flow_dim": dm,
            "num_classes": c, "distinct_test_sequences": distinct, "options": options,
            **{k: int(v.size) for k, v in parts.items()}}
    describe = (f"{p.head} on {parts['train'].size} train / {parts['val'].size} val / {parts['test'].size} test "
                f"videos, {c} classes, rgb {da}-d, flow {dm}-d, P={P}, N={n}, {va} view(s)")
    version = HEADS[p.head].version  # a head's own version, digested only when it has one (old runs stay fresh)
    return Plan(digest({"head_options": options, **({"head_version": version} if version else {})}), info, describe)


def run(ctx: StageContext, plan: Plan) -> dict:
    from pipeline.eval.plots import confusion_matrix_plot, training_curves

    p: TrainHeadParams = ctx.params
    info = plan.data
    name = ctx.dir.name
    path = Path(info["path"])
    ds = FeatureDataset(path, STREAMS, dtype=None)
    parts = split_indices(ds.split, info["path"])
    bad = nonfinite_videos(path)
    if bad:
        for vid, why in bad.items():
            ctx.journal.record_failure(vid, f"{why} in {info['path']}")
        shown = "; ".join(f"{v} ({w})" for v, w in list(bad.items())[:10])
        if not ctx.allow_failures:
            raise StageError(f"{info['path']}: {len(bad)} video(s) have damaged or NaN/inf features: {shown}"
                             f"{' ...' if len(bad) > 10 else ''}. Re-run `pipeline extract-features` for them, "
                             "or pass --allow-failures to train without them")
        ctx.log.warning("training without %d video(s) with damaged or NaN/inf features: %s", len(bad), shown)
        keep = ~np.isin(np.asarray(ds.video_ids).astype(str), list(bad))
        parts = {k: v[keep[v]] for k, v in parts.items()}
    tr, va, test = parts["train"], parts["val"], parts["test"]
    labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
    view = info["train_view"]
    # Training and validation read the centre view of every position, the test every view; in memory when the
    # first fits the budget (stored dtype, cast per batch), else read from the store as needed (same results).
    budget = memory_budget(p.max_memory)
    arrays = {k: tuple(ds.array(s, view, parts[k]) for s in STREAMS) for k in ("train", "val")}
    fit_bytes = sum(a.nbytes for pair in arrays.values() for a in pair)
    in_memory = fit_bytes <= budget
    ctx.log.info("features: %s (train + val, one view) %s the memory budget %s: %s", format_size(fit_bytes),
                 "fit" if in_memory else "exceed", format_size(budget),
                 "in memory" if in_memory else "read from the store as needed")
    if in_memory:
        arrays = {k: tuple(load_array(a) for a in pair) for k, pair in arrays.items()}
    n = p.segments
    if info["distinct_test_sequences"] < p.num_test:
        ctx.log.warning("%d positions per video and N=%d: segments hold fewer than %d positions, so only %d of "
                        "the %d test sequences are distinct (repeats are averaged in)", info["P"], n,
                        p.num_test, info["distinct_test_sequences"], p.num_test)
    try:
        device = dist.device(p.device)  # the one device rule: this rank's (pipeline.dist)
    except ValueError as e:
        raise StageError(f"--device {p.device}: {e}") from None
    options = info["options"]
    kwargs = head_kwargs(p.head, options, p.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        head = make_head(p, options, num_classes=info["num_classes"], rgb_dim=info["rgb_dim"],
                         flow_dim=info["flow_dim"])
    bar = ctx.progress(p.max_epochs, f"train-head {name}", unit="epoch")
    curves = EpochScalars(ctx.dir, p.tensorboard)

    def on_epoch(rec: dict) -> None:
        curves.epoch(rec["epoch"], rec)
        bar.update(1)
        bar.set_postfix_str(f"lr {rec['lr']:.0e} loss {rec['train_loss']:.3f} val err {rec['val_error']:.3f}")
        ctx.log.debug("epoch %(epoch)d lr %(lr).0e train loss %(train_loss).4f val loss %(val_loss).4f "
                      "val error %(val_error).4f", rec)

    t0 = time.perf_counter()
    try:
        history = fit_head(head, (*arrays["train"], labels[tr]), (*arrays["val"], labels[va]), num_segments=n,
                           lr=p.lr, min_lr=p.min_lr, patience=p.patience, batch_size=p.batch_size,
                           max_epochs=p.max_epochs, num_test=p.num_test, device=device, seed=p.seed, log=on_epoch,
                           max_bytes=budget)
    except NonFiniteLoss as e:
        raise NonFiniteLoss(f"{head_key(p)}: {e}; nothing was written") from None
    finally:
        bar.close()
        curves.close()
    fit_seconds = time.perf_counter() - t0

    # Test views in blocks of what is left of the budget (the training features stay cached for ablate's next head).
    scores = eval_scores(head, *(ds.array(s, None, test) for s in STREAMS), n, p.num_test, p.test_fusion,
                         max_bytes=budget - fit_bytes if in_memory else budget).numpy()
    class_names = [str(c) for c in ds.class_names]
    video_ids = np.asarray(ds.video_ids)
    ts = TestScores(scores, video_ids[test], ds.labels[test], class_names)
    ev = accuracy_metrics(ts.scores, ts.labels, class_names)

    save_checkpoint(ctx.dir / artifacts.BEST, {
        "model": {k: v.detach().cpu() for k, v in head.state_dict().items()}, "head": p.head,
        "head_kwargs": kwargs, "head_options": options, "num_classes": info["num_classes"],
        "rgb_dim": info["rgb_dim"], "flow_dim": info["flow_dim"], "num_segments": n, "classes": class_names,
        "positions": info["P"], "epoch": history.best_epoch, "params": params_dict(p),
        "metrics": {"top1": ev.top1, "top5": ev.as_dict()["top5"], "mean_class_accuracy": ev.mean_class_accuracy},
    })
    save_test_scores(ctx.dir / artifacts.SCORES, ts)
    results = {
        "name": name, "head": p.head, "head_kwargs": kwargs, "head_options": options, "params": params_dict(p),
        **ev.as_dict(), "videos": {"train": int(tr.size), "val": int(va.size), "test": int(test.size)},
        "val_video_ids": [str(v) for v in video_ids[va]],
        "features_in_memory": in_memory,
        "positions": info["P"], "views": info["views"], "segments": n, "num_test": p.num_test,
        "distinct_test_sequences": info["distinct_test_sequences"], "test_fusion": p.test_fusion,
        "device": str(device), "fit_seconds": fit_seconds, "history": history.as_dict(),
    }
    write_json(ctx.dir / artifacts.RESULTS, results)
    title = f"{head_key(p)}: top-1 {100 * ev.top1:.1f}%"
    confusion_matrix_plot(ev.confusion, class_names, ctx.dir / artifacts.CONFUSION, title=title)
    training_curves([{**r, "val_acc": 1.0 - r["val_error"]} for r in history.epochs], ctx.dir / artifacts.CURVES,
                    title=head_key(p))
    line = (f"{head_key(p)}: top-1 {100 * ev.top1:.1f}%, mean class accuracy "
            f"{100 * ev.mean_class_accuracy:.1f}% on {test.size} test videos ({len(history.epochs)} epochs, "
            f"best {history.best_epoch}, {fit_seconds:.1f} s on {device})")
    ctx.log.info(line)
    return {"line": line, "top1": ev.top1, "mean_class_accuracy": ev.mean_class_accuracy,
            "epochs": len(history.epochs), "best_epoch": history.best_epoch, "fit_seconds": fit_seconds,
            "test_videos": int(test.size)}


STAGE = Stage(
    name="train-head", version=VERSION, params_type=TrainHeadParams, plan=plan, run=run,
    upstream=lambda params: (_upstream_key(params),), key=lambda params: head_key(params),
    help="Train a temporal head (STFN, STCB, baselines) on the cached features and evaluate it.",
)
