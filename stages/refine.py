"""``refine``: train both backbones and a trained temporal head together, end to end ([STFN] §4.2, second step).

Starts from ``finetune/<scope>/{rgb,flow}/best.pt`` and ``train-head/<scope>/<name>/best.pt``, trains the
whole :class:`pipeline.models.two_stream.TwoStreamSegmentNet` with the one training loop
(:func:`pipeline.training.loop.fit`; the two-stream parts in :mod:`pipeline.training.end_to_end`) and tests it
with train-head's protocol, so "head only -> refined" scores the same frames before and after. Outputs in
``<cache>/refine/<scope>/<name>/``: ``best.pt``, ``last.pt`` (a killed run resumes from it), ``history.csv``,
``curves.png``, ``confusion.png``, ``test_scores.npz`` and ``results.json`` (with ``comparison``). The sampling,
partial BN, micro-batches, distributed training and the test protocol are described in ``docs/training.md``.

Examples:

\b
    pipeline refine
    pipeline refine --head-name stfn-a-avg-bi-n7-s0 --batch-size 32 --micro-batch 4
    torchrun --standalone --nproc-per-node 4 -m stages refine --micro-batch 2
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.streams import STREAMS
from pipeline.data.clips import VideoList, split_videos
from pipeline.data.paired import PairedClips, PairedTestSequences
from pipeline.data.sampling import NUM_TEST
from pipeline.data.table import VideoTable
from pipeline.eval.metrics import accuracy_metrics
from pipeline.flow.stored import flow_settings, note_without_flow, without_flow
from pipeline.eval.results import TestScores, save_test_scores
from pipeline.io import artifacts
from pipeline.io.atomic import save_checkpoint
from pipeline.io.atomic import write_json as write_json_atomic
from pipeline.models.backbones import backbone_info
from pipeline.models.heads import head_output_name, load_head_checkpoint
from pipeline.models.two_stream import build_two_stream, enable_gradient_checkpointing
from pipeline.stage import Plan, Stage, StageContext, StageError, Upstream, digest, finished_outputs, param, \
    params_dict
from pipeline.training import end_to_end as E2E
from pipeline.training import loop as T

VERSION = "1"
#: The default head: train-head's default output (STFN a, avg, bi, N = 5; [STFN] §4.2).
DEFAULT_HEAD = head_output_name()


def _output_name(name: str) -> str | None:
    if not name or "/" in name or name.startswith("."):
        return "must be the name of a train-head output (the folder under train-head/)"
    return None


@dataclass(frozen=True)
class RefineParams:
    head_name: str = param(DEFAULT_HEAD, "The train-head output to refine (train-head/<name>), with the "
                           "finetune/rgb and finetune/flow backbones it was trained on.", check=_output_name)
    split: int = param(1, "Split of the backbones and head (finetune/train-head --split).",
                       scope="split", min=1)
    backbone: str = param(artifacts.DEFAULT_BACKBONE, "Backbone of finetune's outputs (finetune --arch).",
                          scope="backbone")
    input_size: int = param(0, "Network input side in pixels; 0: each finetune checkpoint's own.", min=0)
    batch_size: int = param(32, "Videos per SGD step over all ranks ([STFN] §4.2: 32); reached by "
                            "accumulating micro-batches.", min=1)
    micro_batch: int = param(4, "Videos per forward/backward pass on one rank (each N frames + N flow stacks); "
                             "gradients accumulate up to --batch-size.", min=1)
    lr: float = param(1e-3, "Initial learning rate ([STFN] §4.2: 1e-3), for backbones and head alike.", min=0.0,
                      min_exclusive=True)
    momentum: float = param(0.9, "SGD momentum ([STFN] §4.2: 0.9).", min=0.0, max=1.0, max_exclusive=True)
    weight_decay: float = param(5e-4, "Weight decay on conv and linear weights (as finetune, TSN: 5e-4).",
                                min=0.0)
    patience: int = param(3, "Epochs without a lower validation error before the learning rate is divided by "
                          "10 ([STFN] §4.2: 'when the validation error saturates').", min=0)
    lr_decays: int = param(2, "Stop at the first plateau after this many divisions by 10 (as finetune).", min=0)
    epochs: int = param(30, "Maximum number of epochs (0: evaluate the starting networks only).", min=0)
    partial_bn: str = param("auto", "TSN partial BN of each backbone (freeze every BatchNorm but the first). "
                            "auto: on, since refine starts from trained backbones (TSN's rule for pre-trained "
                            "networks; measured on the demo: off lets the statistics drift, -6 points).",
                            choices=("auto", "on", "off"))
    num_test: int = param(NUM_TEST, "Test sequences per video ([STFN] §4.2: 5), as train-head.", min=1)
    seed: int = param(0, "Seed of the data order, augmentation, dropout and validation hold-out.")
    grad_checkpoint: str = param("auto", "Gradient checkpointing of the backbones' residual stages: less "
                                 "memory, ~1/3 more compute, same result. auto: on CUDA.",
                                 choices=("auto", "on", "off"), fingerprint=False)
    workers: int = param(-1, "DataLoader worker processes per rank (-1: auto, 0: load in the main process).",
                         fingerprint=False, min=0, also=(-1,))
    device: str = param("auto", "auto (CUDA when available), cpu or cuda.", fingerprint=False,
                        choices=("auto", "cpu", "cuda"))
    amp: bool = param(True, "bf16 autocast and channels_last on CUDA (ignored on CPU).", fingerprint=False)
    tensorboard: bool = param(False, "Write per-epoch loss, accuracy and lr for TensorBoard to <output>/tensorboard/.",
                              fingerprint=False)


def _key(p: RefineParams) -> str:
    return artifacts.refine_key(p.head_name, p.split, p.backbone)


def _upstream(p: RefineParams, cache_root: Path) -> tuple[str, ...]:
    head = artifacts.head_key(p.head_name, p.split, p.backbone)
    found = finished_outputs(cache_root, artifacts.TRAIN_HEAD, artifacts.scope(p.split, p.backbone))
    if head not in found:
        listed = ", ".join(artifacts.key_parts(k).name for k in found) or "none"
        raise StageError(f"refine --head-name {p.head_name}: no finished train-head output "
                         f"{Path(cache_root) / head}; available train-head outputs: {listed}. Run "
                         f"`pipeline train-head` for it or pick one with --head-name")
    return ("decode", "extract-flow", *(artifacts.finetune_key(s, p.split, p.backbone) for s in STREAMS), head)


# ----------------------------------------------------------------------------------------------------------
# Plan: everything checked before work starts
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Data:
    classes: list[str]
    train: VideoList
    val: VideoList
    test: VideoList
    frames: object  # VideoStore
    flows: object  # VideoStore
    sources: dict  # stream -> {"path", "ckpt params", ...}
    head_path: Path
    head_meta: dict
    positions: int
    rgb_size: int
    flow_size: int
    flow_length: int
    flow_bound: float
    flow_step: int
    partial_bn: dict
    head_only: dict
    left_out: dict  # video -> why it has no flow (extract-flow's failures)


def plan(p: RefineParams, upstream: Upstream) -> Plan:
    from pipeline.io.artifacts import frame_store
    from pipeline.io.artifacts import flow_store

    T.check_plan(tensorboard=p.tensorboard, batch_size=p.batch_size)
    table = VideoTable.load(upstream.dir("decode"))
    fkeys = {s: artifacts.finetune_key(s, p.split, p.backbone) for s in STREAMS}
    ck = {s: artifacts.finetune_checkpoint(upstream.dir(fkeys[s]), table.classes) for s in STREAMS}
    fparams = {s: upstream.manifests[fkeys[s]].params or dict(ck[s][1].get("params") or {}) for s in STREAMS}
    for s in STREAMS:
        if int(fparams[s].get("split", 1)) != p.split:
            raise StageError(f"{upstream.dir(fkeys[s])}: trained on split {fparams[s].get('split')}, refine "
                             f"--split {p.split} asked")
    split = p.split
    flow_length = ck["flow"][1]["in_channels"] // 2
    if ck["rgb"][1]["in_channels"] != 3 or ck["flow"][1]["in_channels"] != 2 * flow_length:
        raise StageError(f"finetune/rgb/best.pt takes {ck['rgb'][1]['in_channels']} channels and finetune/flow/"
                         f"best.pt {ck['flow'][1]['in_channels']}; expected 3 and 2L")

    # The head: its classes and feature widths must be the backbones'.
    head_dir = upstream.dir(artifacts.head_key(p.head_name, p.split, p.backbone))
    head_path = artifacts.checkpoint_file(head_dir, artifacts.TRAIN_HEAD)
    try:
        head, head_ckpt = load_head_checkpoint(head_path)
    except Exception as e:  # noqa: BLE001 - unreadable or inconsistent file: one clear message
        raise StageError(f"{head_path}: cannot load the head ({type(e).__name__}: {e})") from None
    dims, min_sizes = {}, {}
    for s in STREAMS:
        path, c = ck[s]
        try:
            spec = backbone_info(c["arch"])
        except ValueError as e:
            raise StageError(f"{path}: {e}") from None
        dims[s], min_sizes[s] = spec["num_features"], spec["min_input_size"]
    artifacts.check_classes(head_path, head_ckpt, table.classes, artifacts.TRAIN_HEAD)
    if (head_ckpt["rgb_dim"], head_ckpt["flow_dim"]) != (dims["rgb"], dims["flow"]):
        raise StageError(f"{head_path}: the head takes rgb {head_ckpt['rgb_dim']}-d and flow "
                         f"{head_ckpt['flow_dim']}-d features, but finetune/rgb ({ck['rgb'][1]['arch']}) gives "
                         f"{dims['rgb']}-d and finetune/flow ({ck['flow'][1]['arch']}) {dims['flow']}-d; re-run "
                         "extract-features and train-head on these backbones")
    # The head-only figures refine compares with, and the P feature positions its test sequences pick from
    # (recorded in the head's checkpoint; its results for heads trained before that).
    try:
        head_results = artifacts.read_results(head_dir, artifacts.TRAIN_HEAD)
        positions = int(head_ckpt.get("positions") or head_results["positions"])
        head_only = {"top1": float(head_results["top1"]),
                     "mean_class_accuracy": float(head_results["mean_class_accuracy"]),
                     "views": int(head_results.get("views", 1)), "test_fusion": head_results.get("test_fusion")}
    except artifacts.ArtifactError as e:
        raise StageError(str(e)) from None
    except (ValueError, KeyError, TypeError) as e:
        raise StageError(f"{head_dir / artifacts.RESULTS}: cannot read the head's positions and accuracy ({e}); "
                         f"re-run `pipeline train-head` for {p.head_name}") from None
    results_path = head_dir / artifacts.RESULTS
    n = int(head_ckpt["num_segments"])
    if positions < n:
        raise StageError(f"{results_path}: {positions} positions for {n} segments")

    try:
        videos = split_videos(table, split)
    except ValueError as e:
        raise StageError(f"{upstream.dir(artifacts.DECODE) / artifacts.TABLE}: {e}") from None

    flows = flow_store(upstream.dir("extract-flow"))
    try:  # the videos extract-flow failed (and accepted: its manifest is complete) have no flow: left out
        videos, left_out = without_flow(videos, upstream.manifests["extract-flow"], upstream.dir("extract-flow"))
    except ValueError as e:
        raise StageError(str(e)) from None
    used = videos.train.video_ids + videos.val.video_ids + videos.test.video_ids
    missing = [v for v in used if not flows.path(v).exists()]
    if missing:
        raise StageError(f"{len(missing)} video(s) have no flow in {flows.root}, e.g. {', '.join(missing[:3])}; "
                         "re-run `pipeline extract-flow`")
    try:  # the flow store's bound and step, as extract-flow recorded them (every container is checked)
        flow_bound, flow_step = flow_settings(upstream.manifests["extract-flow"], upstream.dir("extract-flow"))
    except ValueError as e:
        raise StageError(str(e)) from None
    sizes = {s: p.input_size or int(ck[s][1].get("input_size") or fparams[s].get("input_size") or 224)
             for s in STREAMS}
    for s in STREAMS:
        if sizes[s] < min_sizes[s]:
            raise StageError(f"{ck[s][1]['arch']} needs --input-size >= {min_sizes[s]} (got {sizes[s]})")
    data = _Data(
        classes=list(table.classes), train=videos.train, val=videos.val, test=videos.test,
        frames=frame_store(upstream.dir("decode")), flows=flows,
        sources={s: {"path": str(ck[s][0]), "arch": ck[s][1]["arch"], "in_channels": ck[s][1]["in_channels"]}
                 for s in STREAMS},
        head_path=head_path, head_meta={k: v for k, v in head_ckpt.items() if k != "model"}, positions=positions,
        rgb_size=sizes["rgb"], flow_size=sizes["flow"], flow_length=flow_length,
        flow_bound=flow_bound, flow_step=flow_step,
        partial_bn={s: p.partial_bn != "off" for s in STREAMS}, head_only=head_only, left_out=left_out)
    inputs = digest({"classes": table.classes, "train": data.train.video_ids, "val": data.val.video_ids,
                     "test": data.test.video_ids, "labels": list(data.train.labels + data.test.labels),
                     "frames": list(data.train.num_frames + data.test.num_frames), "positions": positions})
    describe = (f"{head_ckpt['head']} head {p.head_name} (N={n}) on {ck['rgb'][1]['arch']} rgb {sizes['rgb']}px + "
                f"{ck['flow'][1]['arch']} flow {sizes['flow']}px, {len(table.classes)} classes, {len(data.train)} "
                f"train / {len(data.val)} val ({len({table.groups[i] for i in table.indices(split, 'val')})} groups) / {len(data.test)} test videos")
    return Plan(inputs, data, describe)


# ----------------------------------------------------------------------------------------------------------
# Training (the loop: pipeline.training.loop.fit; the two-stream parts: pipeline.training.end_to_end)
# ----------------------------------------------------------------------------------------------------------

def _checkpoint_meta(p: RefineParams, data: _Data) -> dict:
    return {"sources": data.sources, "head": data.head_meta["head"], "head_kwargs": data.head_meta["head_kwargs"],
            "num_classes": len(data.classes), "classes": list(data.classes), "rgb_dim": data.head_meta["rgb_dim"],
            "flow_dim": data.head_meta["flow_dim"], "num_segments": data.head_meta["num_segments"],
            "positions": data.positions, "rgb_size": data.rgb_size, "flow_size": data.flow_size,
            "flow_length": data.flow_length, "params": params_dict(p)}


def _fit(p: RefineParams, data: _Data, device: torch.device, info: T.DistInfo, out: Path, ckpt: dict | None,
         log) -> dict:
    meta = _checkpoint_meta(p, data)
    model = build_two_stream(data.sources, data.head_path, amp=p.amp)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    for s in STREAMS:
        if data.partial_bn[s]:
            T.freeze_partial_bn(getattr(model, s))
    use_ckpt = p.grad_checkpoint == "on" or (p.grad_checkpoint == "auto" and device.type == "cuda")
    if use_ckpt:
        for s in model.streams:
            enable_gradient_checkpointing(getattr(model, s))
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if info.distributed:
        # BatchNorm statistics are per micro-batch on each rank (no collective in forward: ranks may run
        # different numbers of micro-batches in a step); rank 0's running statistics are saved.
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)

    workers = T.auto_workers(p.workers, info.world_size)
    flow_kw = {"flow_length": data.flow_length, "flow_bound": data.flow_bound, "flow_step": data.flow_step,
               "rgb_size": data.rgb_size, "flow_size": data.flow_size}
    n = model.num_segments
    train_set = PairedClips(data.frames, data.flows, data.train, num_segments=n, seed=p.seed, **flow_kw)
    batches = T.EpochBatches(len(train_set), p.batch_size, seed=p.seed, rank=info.rank, world_size=info.world_size,
                             drop_last=True)
    train_loader = T.make_loader(train_set, workers=workers, device=device, batch_sampler=batches)

    def sequences(videos: VideoList):
        ds = PairedTestSequences(data.frames, data.flows, videos, num_segments=n, num_positions=data.positions,
                                 num_test=p.num_test, **flow_kw)
        mine = T.rank_share(len(videos), info)
        return T.make_loader(ds, workers=min(workers, len(mine)), device=device, batch_size=None, sampler=mine)

    val_loader = sequences(data.val) if len(data.val) else None
    chunk = max(p.micro_batch * n, 1)

    def validate() -> tuple[float, float]:
        probs = E2E.predict(model, val_loader, len(data.val), len(data.classes), device=device, chunk=chunk)
        return T.val_metrics(probs, data.val.labels)

    best = None
    if ckpt is None:
        # The starting point (backbones + head as trained separately) is the best so far until an epoch
        # beats it on validation; with --epochs 0 it is what gets tested.
        best = {"epoch": 0, "val_acc": -1.0, "val_loss": math.inf}
        if val_loader is not None:
            acc, loss = validate()
            best = {"epoch": 0, "val_acc": acc, "val_loss": loss}
        if info.is_main:
            save_checkpoint(out / artifacts.BEST, {**meta, "model": model.state_dict(), "epoch": 0,
                                                   "metrics": {"val_acc": best["val_acc"], "val_loss": best["val_loss"]}})
    res = T.fit(model, lambda opt, progress: T.train_one_epoch(net, train_loader, opt, device=device,
                                                                loss_fn=E2E.two_stream_loss,
                                                                micro_batch=p.micro_batch, progress=progress),
                schedule=T.Schedule(lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay, patience=p.patience,
                                    lr_decays=p.lr_decays, epochs=p.epochs, seed=p.seed),
                batches=batches, validate=validate if val_loader is not None else None, out=out, meta=meta,
                ckpt=ckpt, info=info, log=log, net=net, train_mode=lambda: E2E.set_train_mode(model), best=best,
                last_extra={"start_val": dict(best) if best is not None else {}},
                rate=("videos_per_s", "samples", "videos"), desc=f"refine {p.head_name}", unit="video",
                tensorboard=p.tensorboard)
    probs = E2E.predict(model, sequences(data.test), len(data.test), len(data.classes), device=device, chunk=chunk)
    return {"history": res.history, "best": res.best, "start_val": res.extra["start_val"], "probs": probs,
            "epochs": res.epochs, "decays": res.decays, "grad_checkpoint": use_ckpt}


#: What a checkpoint left by a killed run must share with this run to be resumed.
RESUME_KEYS = ("sources", "head", "num_classes", "classes", "num_segments")


def run(ctx: StageContext, plan: Plan) -> dict:
    from pipeline.eval.plots import confusion_matrix_plot, training_curves

    p: RefineParams = ctx.params
    data: _Data = plan.data
    info, device, ckpt = T.start_run(ctx, p.device, _checkpoint_meta(p, data), RESUME_KEYS)
    if info.is_main:
        note_without_flow(ctx.log, data.left_out)
    t0 = time.perf_counter()
    res = _fit(p, data, device, info, ctx.dir, ckpt, ctx.log)
    if not info.is_main:
        return {}
    seconds = time.perf_counter() - t0

    ts = TestScores(res["probs"].numpy(), np.array(data.test.video_ids), np.array(data.test.labels), data.classes)
    ev = accuracy_metrics(ts.scores, ts.labels, data.classes)
    save_test_scores(ctx.dir / artifacts.SCORES, ts)
    for vid, label, pred in zip(data.test.video_ids, ts.labels, ts.scores.argmax(1)):
        ctx.journal.record_ok(vid, label=int(label), pred=int(pred))
    head_only = data.head_only
    comparison = {
        "head_only": {"top1": head_only["top1"], "mean_class_accuracy": head_only["mean_class_accuracy"],
                      "source": f"{artifacts.head_key(p.head_name, p.split, p.backbone)}/{artifacts.RESULTS}"},
        "refined": {"top1": ev.top1, "mean_class_accuracy": ev.mean_class_accuracy},
        "delta_top1": ev.top1 - head_only["top1"],
        "delta_mean_class_accuracy": ev.mean_class_accuracy - head_only["mean_class_accuracy"],
    }
    notes = []
    if head_only["views"] > 1:
        notes.append(f"the head-only figure fuses {head_only['views']} spatial views per position; refined is "
                     "tested on the centre view")
    if head_only["test_fusion"] not in (None, "mean"):
        notes.append(f"the head-only figure fuses its test sequences by {head_only['test_fusion']}; refined "
                     "averages them")
    if notes:
        comparison["note"] = "; ".join(notes)
    best = res["best"]
    name = ctx.dir.name
    results = {
        "name": name, "head": data.head_meta["head"], "head_kwargs": data.head_meta["head_kwargs"],
        "params": params_dict(p), **ev.as_dict(), "comparison": comparison,
        "videos": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "val_video_ids": list(data.val.video_ids),
        "segments": data.head_meta["num_segments"], "positions": data.positions, "num_test": p.num_test,
        "views": 1, "input_size": {"rgb": data.rgb_size, "flow": data.flow_size},
        "backbones": {s: data.sources[s]["arch"] for s in STREAMS}, "partial_bn": data.partial_bn,
        "grad_checkpoint": res["grad_checkpoint"], "epochs": res["epochs"], "best_epoch": best["epoch"],
        "start_val": {k: (None if v is None or not math.isfinite(v) or v < 0 else v)
                      for k, v in res["start_val"].items() if k != "epoch"},
        "lr_decays": res["decays"], "history": res["history"], "device": str(device),
        "world_size": info.world_size, "seconds": seconds,
    }
    write_json_atomic(ctx.dir / artifacts.RESULTS, results)
    if res["history"]:
        training_curves(res["history"], ctx.dir / artifacts.CURVES, title=_key(p))
    confusion_matrix_plot(ev.confusion, data.classes, ctx.dir / artifacts.CONFUSION,
                          title=f"{_key(p)}: top-1 {100 * ev.top1:.1f}%")
    line = (f"{_key(p)}: top-1 {100 * ev.top1:.1f}%, mean class accuracy {100 * ev.mean_class_accuracy:.1f}% "
            f"on {len(data.test)} test videos (head only -> refined: top-1 {100 * head_only['top1']:.1f}% -> "
            f"{100 * ev.top1:.1f}%, {100 * comparison['delta_top1']:+.1f}); {res['epochs']} epochs, best "
            f"{best['epoch']}, {seconds:.0f} s on {device}"
            + (f"; {len(data.left_out)} video(s) without flow left out" if data.left_out else ""))
    ctx.log.info(line)
    return {"line": line, "top1": ev.top1, "mean_class_accuracy": ev.mean_class_accuracy,
            "head_only_top1": head_only["top1"], "delta_top1": comparison["delta_top1"], "epochs": res["epochs"],
            "best_epoch": best["epoch"], "test_videos": len(data.test), "seconds": seconds,
            "left_out": data.left_out}


STAGE = Stage(
    name="refine", version=VERSION, params_type=RefineParams, plan=plan, run=run, upstream=_upstream, key=_key,
    help="Train both backbones and a trained head end to end ([STFN] §4.2, second training step).",
)
