"""``finetune``: train the appearance (RGB) or motion (flow) ConvNet of the two-stream network.

[STFN] §4.2 ("Two-stream ConvNets"): ResNet-101 or Inception-V3 initialised from ImageNet, classifier
replaced by a C-way layer; RGB frames or stacks of L = 10 flow fields (first conv by TSN cross-modality
averaging); multi-scale corner crops resized to 224 and horizontal flips, the same for every frame of a
sample; SGD with batch 32, momentum 0.9, learning rate 1e-3 divided by 10 when the validation error
saturates. Validation videos are whole groups held out of the training split (UCF101's gNN), so that
near-duplicate clips do not leak. Test: 25 uniformly spaced centre views per video, scores averaged.

Outputs in ``<cache>/finetune/<stream>/``: ``best.pt`` (best validation accuracy), ``last.pt`` (every
epoch, for resuming), ``history.csv``, ``curves.png``, ``test_scores.npz`` (per test video: ``scores``
(V, C) softmax averaged over the views, ``logits`` (V, C) averaged raw scores, ``video_ids``, ``labels``,
``class_names``), ``confusion.png``; top-1 and mean class accuracy in the manifest's summary.

Resume: a killed run restarts from ``last.pt`` (model, optimizer, schedule, history); the data order and
augmentation are functions of (seed, epoch, video), and the dropout generator is re-seeded every epoch, so
the resumed run ends with the same weights as an uninterrupted one.

Distributed: ``torchrun --nproc-per-node K -m stages finetune ...``. :func:`pipeline.stage.run_stage` lets
rank 0 lock, decide and write the manifest; every rank then runs ``run`` and trains under
DistributedDataParallel on its slice of each global batch (BatchNorm statistics over the global batch), and
only rank 0 writes checkpoints, logs and scores. Test videos are shared among the ranks.

Examples:

\b
    pipeline finetune --stream rgb --arch resnet101
    pipeline finetune --stream flow --arch resnet101 --weights imagenet
    torchrun --standalone --nproc-per-node 2 -m stages finetune --stream flow
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.stage import Plan, Stage, StageContext, StageError, Upstream, digest, file_sha256, param, params_dict
from pipeline.data.clips import EvalViews, TrainClips, VideoList, input_channels, input_normalizer, split_videos
from pipeline.streams import STREAMS
from pipeline.models.backbones import (backbone_info, create_backbone, imagenet_weights_path, list_backbones,
                                      require_imagenet_weights)
from pipeline.flow.stored import flow_settings, note_without_flow, without_flow
from pipeline.interop.checkpoints import convert_foreign
from pipeline.io import artifacts
from pipeline.io.store import VideoStore
from pipeline.data.table import VideoTable
from pipeline.eval.metrics import accuracy_metrics
from pipeline.eval.results import TestScores, save_test_scores
from pipeline.training import loop as T
from pipeline.training.tensorboard import TensorBoardMissing
from pipeline.training.tensorboard import check_available as check_tensorboard

VERSION = "1"
log = logging.getLogger("pipeline")

#: TSN (Wang et al. 2016, §3.2 "Network training"): dropout 0.8 for the spatial, 0.7 for the temporal net.
TSN_DROPOUT = {"rgb": 0.8, "flow": 0.7}


@dataclass(frozen=True)
class FinetuneParams:
    stream: str = param("rgb", "Which network: rgb (appearance) or flow (motion; reads extract-flow).",
                        choices=STREAMS)
    arch: str = param("resnet101", "Backbone ([STFN] §4.2 uses resnet101 and inception_v3).",
                      choices=list_backbones(), aliases=("--backbone",), scope="backbone")
    input_size: int = param(224, "Network input side in pixels ([STFN] §4.2: 224).", min=1)
    weights: str = param("imagenet", "Initial weights: imagenet (torchvision's, from the torch hub cache; "
                         "never downloaded), none (random), or a path (torchvision state dict, our "
                         "checkpoint, or an mmaction2 / tsn-pytorch TSN checkpoint; a first conv of another "
                         "channel count is re-initialised as TSN's cross-modality average, docs/rawframes.md). "
                         "[STFN] §4.2 starts from ImageNet.")
    split: int = param(1, "Which split of the video table (1..3 for UCF101 / HMDB51).", scope="split", min=1)
    segments: int = param(1, "TSN segments N: one random frame (stack) from each of N equal parts, scores "
                          "averaged (consensus). 1 is the two-stream sampling [STFN] §4.2 describes for "
                          "these networks (its N = 5 segments are for STFN); TSN uses 3.", min=1)
    batch_size: int = param(32, "Videos per SGD step, over all ranks ([STFN] §4.2: 32).", min=1)
    lr: float = param(1e-3, "Initial learning rate ([STFN] §4.2: 1e-3).", min=0.0, min_exclusive=True)
    momentum: float = param(0.9, "SGD momentum ([STFN] §4.2: 0.9).", min=0.0, max=1.0, max_exclusive=True)
    weight_decay: float = param(5e-4, "Weight decay on conv and linear weights (TSN: 5e-4).", min=0.0)
    patience: int = param(3, "Epochs without a lower validation error before the learning rate is divided "
                          "by 10 ([STFN] §4.2: 'when the validation error saturates').", min=0)
    lr_decays: int = param(2, "Stop at the first plateau after this many divisions by 10 (TSN divides "
                           "twice: 1e-3 -> 1e-5).", min=0)
    epochs: int = param(80, "Maximum number of epochs.", min=1)
    dropout: float = param(-1.0, "Dropout before the classifier; -1: by stream, TSN's 0.8 (rgb) / 0.7 (flow).",
                           min=0.0, max=1.0, max_exclusive=True, also=(-1.0,))
    partial_bn: str = param("auto", "TSN partial BN: freeze every BatchNorm layer but the first. auto: on "
                            "with pretrained weights, off with --weights none (from scratch BN must learn).",
                            choices=("auto", "on", "off"))
    val_frames: int = param(5, "Centre views per validation video (uniformly spaced), each epoch.", min=1)
    num_test_frames: int = param(25, "Centre views per test video, uniformly spaced (two-stream protocol: 25).",
                                 min=1)
    # The flow settings enter the fingerprint of the flow stream only (fingerprint_params below).
    flow_length: int = param(10, "L, flow fields per stack ([STFN] §4.2: 10 -> 20 input channels).",
                             fingerprint=False, min=1)
    flow_bound: float | None = param(None, "Ignored, kept for one release: the flow store's quantisation bound is "
                                     "read from extract-flow's manifest.", fingerprint=False)
    flow_step: int | None = param(None, "Ignored, kept for one release: the flow store's frame step is read from "
                                  "extract-flow's manifest.", fingerprint=False)
    seed: int = param(0, "Seed of initialisation, data order, augmentation and dropout.")
    workers: int = param(-1, "DataLoader worker processes per rank (-1: auto, 0: load in the main process).",
                         fingerprint=False, min=0, also=(-1,))
    device: str = param("auto", "auto (CUDA when available), cpu or cuda.", fingerprint=False,
                        choices=("auto", "cpu", "cuda"))
    amp: bool = param(True, "bf16 autocast and channels_last on CUDA (ignored on CPU).", fingerprint=False)
    tensorboard: bool = param(False, "Write per-epoch loss, accuracy and lr for TensorBoard to <output>/tensorboard/.",
                              fingerprint=False)

    @property
    def drop(self) -> float:
        return TSN_DROPOUT[self.stream] if self.dropout == -1 else self.dropout

    @property
    def use_partial_bn(self) -> bool:
        return self.partial_bn == "on" or (self.partial_bn == "auto" and self.weights != "none")


def _key(p: FinetuneParams) -> str:
    return artifacts.finetune_key(p.stream, p.split, p.arch)


def _upstream(p: FinetuneParams) -> tuple[str, ...]:
    return ("decode", "extract-flow") if p.stream == "flow" else ("decode",)


#: The flow settings 7e8f4a7 digested into every RGB network's fingerprint (their defaults then). Fixed, so
#: that no flow setting changes an RGB network's fingerprint, and the RGB networks fine-tuned before stay fresh.
RGB_FLOW_RECORD = {"flow_length": 10, "flow_bound": 20.0, "flow_step": 1}


def _flow_settings(upstream: Upstream) -> tuple[float, int]:
    """(bound, step) of the flow store, from extract-flow's manifest."""
    try:
        return flow_settings(upstream.manifests["extract-flow"], upstream.dir("extract-flow"))
    except ValueError as e:
        raise StageError(str(e)) from None


def fingerprint_params(p: FinetuneParams, upstream: Upstream) -> dict:
    """The parameters finetune's fingerprint digests: the flow settings count for the flow stream only (L as
    given; the bound and step the flow store was written with, as extract-flow's manifest records them); an RGB
    network carries the constant :data:`RGB_FLOW_RECORD` (the same digest as before the fix)."""
    d = params_dict(p, only_fingerprinted=True)
    if p.stream != "flow":
        return {**d, **RGB_FLOW_RECORD}
    bound, step = _flow_settings(upstream)
    return {**d, "flow_length": p.flow_length, "flow_bound": bound, "flow_step": step}


# ----------------------------------------------------------------------------------------------------------
# Plan: everything checked before work starts
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Data:
    classes: list[str]
    train: VideoList
    val: VideoList
    test: VideoList
    store: VideoStore
    flow: dict  # the flow store's bound and step (flow stream), for the datasets to check every container
    left_out: dict  # video -> why it has no flow (extract-flow's failures; flow stream)


def _check_flow_store(store: VideoStore, videos: list[str], bound: float, step: int) -> None:
    first = store.path(videos[0])
    if not first.exists():
        raise StageError(f"{first}: no flow for video {videos[0]!r}; re-run `pipeline extract-flow`")
    with store.reader(videos[0]) as r:
        attrs = r.attrs
    for name, want in (("bound", bound), ("step", step)):
        found = attrs.get(name)
        if found is not None and float(found) != float(want):
            raise StageError(f"{first}: stored with {name} {found}, but extract-flow's manifest records {want}; "
                             "re-run `pipeline extract-flow`")
    missing = [v for v in videos if not store.path(v).exists()]
    if missing:
        raise StageError(f"{len(missing)} video(s) have no flow in {store.root}, e.g. {', '.join(missing[:3])}; "
                         "re-run `pipeline extract-flow`")


def _weights_digest(weights: str, arch: str) -> str:
    if weights in ("none", "imagenet"):
        return weights if weights == "none" else f"imagenet:{imagenet_weights_path(arch).name}"
    path = Path(weights)
    if not path.is_file():
        raise StageError(f"--weights {weights}: no such file (use none, imagenet or a weights file)")
    return file_sha256(path)


def plan(p: FinetuneParams, upstream: Upstream) -> Plan:
    if p.tensorboard:
        try:
            check_tensorboard()
        except TensorBoardMissing as e:
            raise StageError(str(e)) from None
    decode_dir = upstream.dir("decode")
    table = VideoTable.load(decode_dir)
    # Validation ([STFN] §4.2 validation error): the one hold-out decode recorded in the video table.
    try:
        videos = split_videos(table, p.split)
    except ValueError as e:
        raise StageError(f"{decode_dir / artifacts.TABLE}: {e}") from None
    used = list(videos.train.video_ids + videos.val.video_ids + videos.test.video_ids)

    flow, left_out = {}, {}
    if p.flow_bound is not None or p.flow_step is not None:
        log.warning("finetune: --flow-bound / --flow-step are ignored (the flow store's are read from "
                    "extract-flow's manifest); drop them from the command or config")
    if p.stream == "flow":
        from pipeline.io.artifacts import flow_store

        store = flow_store(upstream.dir("extract-flow"))
        bound, step = _flow_settings(upstream)
        try:  # the videos extract-flow failed (and accepted: its manifest is complete) have no flow: left out
            videos, left_out = without_flow(videos, upstream.manifests["extract-flow"], upstream.dir("extract-flow"))
        except ValueError as e:
            raise StageError(str(e)) from None
        used = [v for v in used if v not in left_out]
        _check_flow_store(store, used, bound, step)
        flow = {"flow_bound": bound, "flow_step": step}
    else:
        from pipeline.io.artifacts import frame_store

        store = frame_store(upstream.dir("decode"))

    # Cheap checks only (no weights loaded, no global RNG touched): the network is built in run().
    try:
        info = backbone_info(p.arch)
        if p.weights == "imagenet":
            require_imagenet_weights(p.arch)
    except (ValueError, FileNotFoundError) as e:
        raise StageError(f"--arch {p.arch} --weights {p.weights}: {e}") from None
    if p.input_size < info["min_input_size"]:
        raise StageError(f"{p.arch} needs --input-size >= {info['min_input_size']} (got {p.input_size})")

    data = _Data(list(table.classes), videos.train, videos.val, videos.test, store, flow, left_out)
    inputs = digest({"classes": table.classes, "train": data.train.video_ids, "val": data.val.video_ids,
                     "test": data.test.video_ids, "labels": list(data.train.labels + data.test.labels),
                     "frames": list(data.train.num_frames + data.test.num_frames),
                     "weights": _weights_digest(p.weights, p.arch)})
    describe = (f"{p.stream} {p.arch}, {len(table.classes)} classes, {len(data.train)} train / {len(data.val)} "
                f"val ({len({table.groups[i] for i in table.indices(p.split, 'val')})} groups) / {len(data.test)} test videos"
                + (f"; {len(left_out)} without flow left out" if left_out else ""))

    return Plan(inputs, data, describe)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

def _checkpoint_meta(p: FinetuneParams, data: _Data) -> dict:
    return {"arch": p.arch, "stream": p.stream, "num_classes": len(data.classes),
            "in_channels": input_channels(p.stream, p.flow_length), "classes": list(data.classes),
            "input_size": p.input_size, "params": params_dict(p)}


def build_model(p: FinetuneParams, num_classes: int) -> torch.nn.Module:
    """The network to fine-tune: ``--weights`` loaded, the new classifier initialised from ``--seed``."""
    try:
        torch.manual_seed(p.seed)  # the random initialisation (new classifier, or everything for none)
        return create_backbone(p.arch, num_classes=num_classes, in_channels=input_channels(p.stream, p.flow_length),
                               weights=p.weights, dropout=p.drop, convert=convert_foreign)
    except (ValueError, FileNotFoundError) as e:
        raise StageError(f"--arch {p.arch} --weights {p.weights}: {e}") from None


def _fit(p: FinetuneParams, data: _Data, device: torch.device, info: T.DistInfo, out: Path,
         ckpt: dict | None, log) -> dict:
    """Train (from ``ckpt`` when resuming), then score the test videos with best.pt. Only rank 0 writes."""
    model = build_model(p, len(data.classes))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if p.use_partial_bn:
        T.freeze_partial_bn(model)
    if info.distributed:
        T.sync_batchnorm(model)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    net = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Running statistics are computed from global batches on every rank alike: no buffer broadcast.
        net = DDP(model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)

    normalize = input_normalizer(p.stream)
    workers = T.auto_workers(p.workers, info.world_size)
    flow_kw = data.flow  # the flow store's bound and step: every container is checked against them
    train_set = TrainClips(data.store, data.train, p.stream, num_segments=p.segments, input_size=p.input_size,
                           flow_length=p.flow_length, seed=p.seed, **flow_kw)
    batches = T.EpochBatches(len(train_set), p.batch_size, seed=p.seed, rank=info.rank,
                             world_size=info.world_size)
    train_loader = T.make_loader(train_set, workers=workers, device=device, batch_sampler=batches)
    loss_fn = T.segment_consensus_loss(normalize, p.amp)

    def views(videos: VideoList, frames: int):
        ds = EvalViews(data.store, videos, p.stream, num_frames=frames, input_size=p.input_size,
                       flow_length=p.flow_length, **flow_kw)
        mine = T.rank_share(len(videos), info)
        return T.make_loader(ds, workers=min(workers, len(mine)), device=device, batch_size=None, sampler=mine)

    val_loader = views(data.val, p.val_frames) if len(data.val) else None
    eval_kw = {"device": device, "normalize": normalize, "amp": p.amp, "chunk": max(p.batch_size, 1)}

    def validate() -> tuple[float, float]:
        probs = T.predict_videos(model, val_loader, len(data.val), len(data.classes), **eval_kw)["probs"]
        return T.val_metrics(probs, data.val.labels)

    res = T.fit(model, lambda opt, progress: T.train_one_epoch(net, train_loader, opt, device=device,
                                                                loss_fn=loss_fn, progress=progress),
                schedule=T.Schedule(lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay, patience=p.patience,
                                    lr_decays=p.lr_decays, epochs=p.epochs, seed=p.seed),
                batches=batches, validate=validate if val_loader is not None else None, out=out,
                meta=_checkpoint_meta(p, data), ckpt=ckpt, info=info, log=log, net=net,
                rate=("frames_per_s", "frames", "images" if p.stream == "rgb" else "stacks"),
                desc=f"finetune {p.stream}", unit="clip", tensorboard=p.tensorboard)
    test = T.predict_videos(model, views(data.test, p.num_test_frames), len(data.test), len(data.classes), **eval_kw)
    return {"history": res.history, "best": res.best, "test": test, "epochs": res.epochs, "decays": res.decays}


#: What a checkpoint left by a killed run must share with this run to be resumed.
RESUME_KEYS = ("arch", "num_classes", "in_channels", "classes")


def run(ctx: StageContext, plan: Plan) -> dict:
    from pipeline.eval.plots import confusion_matrix_plot, training_curves

    p: FinetuneParams = ctx.params
    data: _Data = plan.data
    info, device, ckpt = T.start_run(ctx, p.device, _checkpoint_meta(p, data), RESUME_KEYS)
    if info.is_main:
        note_without_flow(ctx.log, data.left_out)
    t0 = time.perf_counter()
    res = _fit(p, data, device, info, ctx.dir, ckpt, ctx.log)
    if not info.is_main:
        return {}
    seconds = time.perf_counter() - t0

    test = res["test"]
    probs, logits = test["probs"].numpy(), test["logits"].numpy()
    labels = np.asarray(data.test.labels, dtype=np.int64)
    ts = TestScores(probs, np.array(data.test.video_ids), labels, data.classes)
    m = accuracy_metrics(ts.scores, ts.labels, data.classes)
    save_test_scores(ctx.dir / artifacts.SCORES, ts, logits=logits.astype(np.float32), stream=np.array(p.stream))
    for vid, label, pred in zip(data.test.video_ids, labels, probs.argmax(1)):
        ctx.journal.record_ok(vid, label=int(label), pred=int(pred))
    title = f"{p.stream} {p.arch} (split {p.split})"
    training_curves(res["history"], ctx.dir / artifacts.CURVES, title=title)
    confusion_matrix_plot(m.confusion, data.classes, ctx.dir / artifacts.CONFUSION,
                          title=f"{title}: top-1 {m.top1:.1%}")
    history = res["history"]
    fps = [h["frames_per_s"] for h in history]
    waiting = sum(h["data_seconds"] for h in history) / max(sum(h["seconds"] for h in history), 1e-9)
    best = res["best"]
    val = f", best epoch {best['epoch']} (val acc {best['val_acc']:.1%})" if best["val_acc"] >= 0 else ""
    top5 = f", top-5 {m.top5:.1%}" if m.top5 == m.top5 else ""
    line = (f"{_key(p)}: {p.arch} {p.input_size}px, {res['epochs']} epochs{val}; test top-1 "
            f"{m.top1:.1%}{top5}, mean class {m.mean_class_accuracy:.1%} on {len(labels)} videos "
            f"(chance {1 / len(data.classes):.1%}); {float(np.median(fps)) if fps else 0:.0f} "
            f"{'images' if p.stream == 'rgb' else 'stacks'}/s, {seconds:.0f} s"
            + (f"; {len(data.left_out)} video(s) without flow left out" if data.left_out else ""))
    ctx.log.info(line)
    return {"line": line, "top1": m.top1, "top5": m.as_dict()["top5"], "mean_class_acc": m.mean_class_accuracy,
            "best_epoch": best["epoch"],
            "best_val_acc": best["val_acc"] if best["val_acc"] >= 0 else None, "epochs": res["epochs"],
            "lr_decays": res["decays"], "classes": len(data.classes), "train_videos": len(data.train),
            "val_videos": len(data.val), "val_video_ids": list(data.val.video_ids), "test_videos": len(labels),
            "world_size": info.world_size,
            "device": str(device), "median_frames_per_s": float(np.median(fps)) if fps else None,
            "data_wait_fraction": waiting, "seconds": seconds, "left_out": data.left_out}


STAGE = Stage(
    name="finetune", version=VERSION, params_type=FinetuneParams, plan=plan, run=run, upstream=_upstream,
    key=_key, fingerprint_params=fingerprint_params, help="Fine-tune the RGB or flow ConvNet of the two-stream network ([STFN] §4.2).",
)
