"""``refine``: train both backbones and a trained temporal head together, end to end ([STFN] §4.2).

"We apply two step training process. We first fix the weights of trained appearance and motion networks and
train only STFN. Then we train the entire networks with same methods described in Two-stream ConvNets
training." The first step is ``train-head`` on cached features; this stage is the second. It starts from
``finetune/rgb/best.pt``, ``finetune/flow/best.pt`` and ``train-head/<name>/best.pt``: the N segments of a
video pass through the shared-weight RGB backbone (N frames) and flow backbone (the N stacks of L flow fields
centred on the same frames), TSN style; ``forward_features`` gives (B, N, D) per stream and the head fuses
them into class log-probabilities; the loss is the head's (NLL).

Training, as the two-stream ConvNets ([STFN] §4.2) and the finetune stage: TSN segment sampling, one
multi-scale corner crop + flip per video for all its frames and flow stacks ("same augmentations for selected
frames and optical flow stacks in an input sequence"); SGD, momentum 0.9, learning rate 1e-3 divided by 10
when the validation error saturates (stopping at the plateau after ``--lr-decays`` divisions), weight decay on
conv / linear weights. TSN partial BN (every BatchNorm of a backbone frozen but the first) is on by default,
whatever finetune did: TSN uses it whenever training starts from trained networks, and refine always does;
without it the running statistics drift from those the head was trained on (demo: 79.2% -> 72.9% top-1
with it off, -> 81.2% with it on, 3 epochs). A step takes ``--batch-size`` videos
(32, the paper's batch) in micro-batches of ``--micro-batch`` videos per rank whose gradients accumulate,
so the memory of N x 2 backbone passes per video stays bounded; BatchNorm statistics are those of a
micro-batch. Validation videos are the one hold-out decode recorded in the video table
(:mod:`pipeline.data.splits`), the same as finetune's and train-head's. On CUDA: bf16 autocast + channels_last (``--amp``) and gradient
checkpointing of the backbones' residual stages / Inception blocks (``--grad-checkpoint auto``: on CUDA).

Test protocol, that of ``train-head``: ``--num-test`` (5) sequences per video, sequence j taking in every
segment the j-th of 5 uniformly spaced of the head's P feature positions (the frames ``extract-features``
computed the head's test features at, centre view); class probabilities averaged over the sequences. So the
"head only -> refined" comparison scores the same frames before and after end-to-end training.

Outputs in ``<cache>/refine/<head name>/``: ``best.pt`` (best validation epoch; :func:`load_refine_checkpoint`)
and ``last.pt`` (every epoch, atomic; a killed run resumes from it and ends in the same state, as
``finetune``), ``history.csv``, ``curves.png``, ``confusion.png``, ``test_scores.npz``
(:mod:`pipeline.eval.results`, read by ``evaluate``) and ``results.json`` (top-1, mean class accuracy, per-class
accuracy, confusion matrix, history, and ``comparison``: head only -> refined).

Distributed: ``torchrun --nproc-per-node K -m stages refine ...``: every rank trains its slice of each
global batch under DistributedDataParallel (gradients synchronised once per step), scores its share of the
validation and test videos; rank 0 writes.

Examples:

\b
    pipeline refine
    pipeline refine --head-name stfn-a-avg-bi-n7-s0 --batch-size 32 --micro-batch 4
    torchrun --standalone --nproc-per-node 4 -m stages refine --micro-batch 2
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import dist
from pipeline.io import artifacts
from pipeline.training import check_finite_loss
from pipeline.training import loop as T
from pipeline.io.atomic import write_json as write_json_atomic
from pipeline.stage import Plan, Stage, StageContext, StageError, Upstream, digest, param, params_dict, \
    read_manifest
from pipeline.data.clips import VideoList
from pipeline.eval.metrics import evaluate
from pipeline.training.heads import NUM_TEST
from pipeline.models.backbones import create_backbone
from pipeline.models.heads import create_head
from pipeline.data.paired import (PairedClips, PairedTestSequences, TwoStreamSegmentNet,
                                  enable_gradient_checkpointing, head_streams)
from pipeline.eval.results import TestScores, save_test_scores
from pipeline.data.table import VideoTable
from stages.train_head import TrainHeadParams, head_name, load_head_checkpoint

VERSION = "1"
#: The default head: train-head's default STFN (a, avg, bi, N = 5; [STFN] §4.2).
DEFAULT_HEAD = head_name(TrainHeadParams())
from pipeline.data import STREAMS  # noqa: E402,F401


@dataclass(frozen=True)
class RefineParams:
    head_name: str = param(DEFAULT_HEAD, "The train-head output to refine (train-head/<name>), with the "
                           "finetune/rgb and finetune/flow backbones it was trained on.")
    split: int = param(1, "Split of the backbones and head (finetune/train-head --split).",
                       scope="split")
    backbone: str = param(artifacts.DEFAULT_BACKBONE, "Backbone of finetune's outputs (finetune --arch).",
                          scope="backbone")
    input_size: int = param(0, "Network input side in pixels; 0: each finetune checkpoint's own.")
    batch_size: int = param(32, "Videos per SGD step over all ranks ([STFN] §4.2: 32); reached by "
                            "accumulating micro-batches.")
    micro_batch: int = param(4, "Videos per forward/backward pass on one rank (each N frames + N flow stacks); "
                             "gradients accumulate up to --batch-size.")
    lr: float = param(1e-3, "Initial learning rate ([STFN] §4.2: 1e-3), for backbones and head alike.")
    momentum: float = param(0.9, "SGD momentum ([STFN] §4.2: 0.9).")
    weight_decay: float = param(5e-4, "Weight decay on conv and linear weights (as finetune, TSN: 5e-4).")
    patience: int = param(3, "Epochs without a lower validation error before the learning rate is divided by "
                          "10 ([STFN] §4.2: 'when the validation error saturates').")
    lr_decays: int = param(2, "Stop at the first plateau after this many divisions by 10 (as finetune).")
    epochs: int = param(30, "Maximum number of epochs (0: evaluate the starting networks only).")
    partial_bn: str = param("auto", "TSN partial BN of each backbone (freeze every BatchNorm but the first). "
                            "auto: on, since refine starts from trained backbones (TSN's rule for pre-trained "
                            "networks; measured on the demo: off lets the statistics drift, -6 points).",
                            choices=("auto", "on", "off"))
    num_test: int = param(NUM_TEST, "Test sequences per video ([STFN] §4.2: 5), as train-head.")
    seed: int = param(0, "Seed of the data order, augmentation, dropout and validation hold-out.")
    grad_checkpoint: str = param("auto", "Gradient checkpointing of the backbones' residual stages: less "
                                 "memory, ~1/3 more compute, same result. auto: on CUDA.",
                                 choices=("auto", "on", "off"), fingerprint=False)
    workers: int = param(-1, "DataLoader worker processes per rank (-1: auto, 0: load in the main process).",
                         fingerprint=False)
    device: str = param("auto", "auto (CUDA when available), cpu or cuda.", fingerprint=False,
                        choices=("auto", "cpu", "cuda"))
    amp: bool = param(True, "bf16 autocast and channels_last on CUDA (ignored on CPU).", fingerprint=False)

    def validate(self) -> None:
        if not self.head_name or "/" in self.head_name or self.head_name.startswith("."):
            raise StageError(f"--head-name {self.head_name!r} must be the name of a train-head output "
                             "(the folder under train-head/)")
        for name in ("batch_size", "micro_batch", "num_test"):
            if getattr(self, name) < 1:
                raise StageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.input_size < 0:
            raise StageError(f"--input-size must be >= 0 (got {self.input_size})")
        if self.epochs < 0 or self.patience < 0 or self.lr_decays < 0:
            raise StageError("--epochs, --patience and --lr-decays must be >= 0")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise StageError(f"need --lr > 0, --weight-decay >= 0 and 0 <= --momentum < 1 (got {self.lr}, "
                             f"{self.weight_decay}, {self.momentum})")


def _key(p: RefineParams) -> str:
    return artifacts.refine_key(p.head_name, p.split, p.backbone)


def available_heads(cache_root: Path, split: int = 1, backbone: str = artifacts.DEFAULT_BACKBONE) -> list[str]:
    """Names of the finished train-head outputs of one split and backbone under ``cache_root``."""
    folder = Path(cache_root) / artifacts.TRAIN_HEAD / artifacts.scope(split, backbone)
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


def _upstream(p: RefineParams, cache_root: Path) -> tuple[str, ...]:
    head = artifacts.head_key(p.head_name, p.split, p.backbone)
    try:
        m = read_manifest(Path(cache_root) / head)
    except StageError:
        m = None
    if not (m and m.get("complete")):
        found = available_heads(cache_root, p.split, p.backbone)
        listed = ", ".join(found) if found else "none"
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


def _load_backbone_ckpt(upstream: Upstream, key: str, stream: str) -> tuple[Path, dict]:
    path = upstream.dir(key) / "best.pt"
    if not path.is_file():
        raise StageError(f"{path}: the finetune/{stream} stage finished but its best.pt is missing; re-run "
                         f"`pipeline finetune --stream {stream} --force`")
    try:
        ckpt = T.load_checkpoint(path)
    except ValueError as e:
        raise StageError(str(e)) from None
    for k in ("arch", "num_classes", "in_channels", "classes"):
        if k not in ckpt:
            raise StageError(f"{path}: not a finetune checkpoint (no {k!r})")
    return path, ckpt


def plan(p: RefineParams, upstream: Upstream) -> Plan:
    from pipeline.io.artifacts import frame_store
    from pipeline.io.artifacts import flow_store

    p.validate()
    if p.batch_size < dist.world_size():
        raise StageError(f"--batch-size {p.batch_size} is smaller than the {dist.world_size()} ranks")
    table = VideoTable.load(upstream.dir("decode"))
    fkeys = {s: artifacts.finetune_key(s, p.split, p.backbone) for s in STREAMS}
    ck = {s: _load_backbone_ckpt(upstream, fkeys[s], s) for s in STREAMS}
    fparams = {s: dict(upstream.manifests[fkeys[s]].get("params") or ck[s][1].get("params") or {})
               for s in STREAMS}
    for s in STREAMS:
        path, c = ck[s]
        if c["classes"] != list(table.classes):
            raise StageError(f"{path}: trained on classes {c['classes'][:5]}..., the video table has "
                             f"{list(table.classes)[:5]}...; re-run finetune on this dataset")
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
    head_path = head_dir / "best.pt"
    if not head_path.is_file():
        raise StageError(f"{head_path}: missing; re-run `pipeline train-head` for {p.head_name}")
    try:
        head, head_ckpt = load_head_checkpoint(head_path)
    except Exception as e:  # noqa: BLE001 - unreadable or inconsistent file: one clear message
        raise StageError(f"{head_path}: cannot load the head ({type(e).__name__}: {e})") from None
    dims, min_sizes = {}, {}
    for s in STREAMS:
        path, c = ck[s]
        try:
            net = create_backbone(c["arch"], num_classes=0, in_channels=c["in_channels"])
        except ValueError as e:
            raise StageError(f"{path}: {e}") from None
        dims[s], min_sizes[s] = net.num_features, net.min_input_size
    if head_ckpt["num_classes"] != len(table.classes):
        raise StageError(f"{head_path}: the head has {head_ckpt['num_classes']} classes, the backbones and the "
                         f"video table {len(table.classes)}; re-run train-head on these backbones' features")
    if list(head_ckpt.get("classes") or table.classes) != list(table.classes):
        raise StageError(f"{head_path}: the head's classes {list(head_ckpt['classes'])[:5]} differ from the video "
                         f"table's {list(table.classes)[:5]}; re-run train-head on these backbones' features")
    if (head_ckpt["rgb_dim"], head_ckpt["flow_dim"]) != (dims["rgb"], dims["flow"]):
        raise StageError(f"{head_path}: the head takes rgb {head_ckpt['rgb_dim']}-d and flow "
                         f"{head_ckpt['flow_dim']}-d features, but finetune/rgb ({ck['rgb'][1]['arch']}) gives "
                         f"{dims['rgb']}-d and finetune/flow ({ck['flow'][1]['arch']}) {dims['flow']}-d; re-run "
                         "extract-features and train-head on these backbones")
    results_path = head_dir / "results.json"
    try:
        head_results = json.loads(results_path.read_text())
        positions = int(head_results["positions"])
        head_only = {"top1": float(head_results["top1"]),
                     "mean_class_accuracy": float(head_results["mean_class_accuracy"]),
                     "views": int(head_results.get("views", 1)), "test_fusion": head_results.get("test_fusion")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StageError(f"{results_path}: cannot read the head's positions and accuracy ({e}); re-run "
                         f"`pipeline train-head` for {p.head_name}") from None
    n = int(head_ckpt["num_segments"])
    if positions < n:
        raise StageError(f"{results_path}: {positions} positions for {n} segments")

    membership = table.split_of(split) if str(split) in table.splits else None
    if membership is None:
        raise StageError(f"split {split} (of finetune) is not in {upstream.dir('decode') / 'videos.json'}")
    train_rows = [i for i, s in enumerate(membership) if s == "train"]
    test_rows = [i for i, s in enumerate(membership) if s == "test"]
    if not train_rows or not test_rows:
        raise StageError(f"split {split}: {len(train_rows)} training and {len(test_rows)} test videos; both needed")
    # The one validation hold-out, recorded by decode in the video table (pipeline/data/splits.py).
    val_rows = [i for i, s in enumerate(membership) if s == "val"]
    fit_rows = train_rows
    if len(fit_rows) < 1:
        raise StageError("no training videos left after the validation hold-out; lower decode's --val-fraction")

    def vl(rows: list[int]) -> VideoList:
        return VideoList(tuple(table.video_ids[i] for i in rows), tuple(table.labels[i] for i in rows),
                         tuple(table.num_frames[i] for i in rows))

    flows = flow_store(upstream.dir("extract-flow"))
    missing = [table.video_ids[i] for i in train_rows + test_rows if not flows.path(table.video_ids[i]).exists()]
    if missing:
        raise StageError(f"{len(missing)} video(s) have no flow in {flows.root}, e.g. {', '.join(missing[:3])}; "
                         "re-run `pipeline extract-flow`")
    ff = fparams["flow"]
    sizes = {s: p.input_size or int(ck[s][1].get("input_size") or fparams[s].get("input_size") or 224)
             for s in STREAMS}
    for s in STREAMS:
        if sizes[s] < min_sizes[s]:
            raise StageError(f"{ck[s][1]['arch']} needs --input-size >= {min_sizes[s]} (got {sizes[s]})")
    data = _Data(
        classes=list(table.classes), train=vl(fit_rows), val=vl(val_rows), test=vl(test_rows),
        frames=frame_store(upstream.dir("decode")), flows=flows,
        sources={s: {"path": str(ck[s][0]), "arch": ck[s][1]["arch"], "in_channels": ck[s][1]["in_channels"]}
                 for s in STREAMS},
        head_path=head_path, head_meta={k: v for k, v in head_ckpt.items() if k != "model"}, positions=positions,
        rgb_size=sizes["rgb"], flow_size=sizes["flow"], flow_length=flow_length,
        flow_bound=float(ff.get("flow_bound", 20.0)), flow_step=int(ff.get("flow_step", 1)),
        partial_bn={s: p.partial_bn != "off" for s in STREAMS}, head_only=head_only)
    inputs = digest({"classes": table.classes, "train": data.train.video_ids, "val": data.val.video_ids,
                     "test": data.test.video_ids, "labels": [table.labels[i] for i in train_rows + test_rows],
                     "frames": [table.num_frames[i] for i in train_rows + test_rows], "positions": positions})
    describe = (f"{head_ckpt['head']} head {p.head_name} (N={n}) on {ck['rgb'][1]['arch']} rgb {sizes['rgb']}px + "
                f"{ck['flow'][1]['arch']} flow {sizes['flow']}px, {len(table.classes)} classes, {len(data.train)} "
                f"train / {len(data.val)} val ({len({table.groups[i] for i in val_rows})} groups) / {len(data.test)} test videos")
    return Plan(inputs, data, describe)


# ----------------------------------------------------------------------------------------------------------
# The model, its checkpoints
# ----------------------------------------------------------------------------------------------------------

def build_model(data: _Data, *, amp: bool = False) -> TwoStreamSegmentNet:
    """Backbones from finetune/*/best.pt, the head from train-head/<name>/best.pt."""
    backbones = {s: create_backbone(src["arch"], num_classes=0, in_channels=src["in_channels"], weights=src["path"])
                 for s, src in data.sources.items()}
    head, _ = load_head_checkpoint(data.head_path)
    return TwoStreamSegmentNet(backbones["rgb"], backbones["flow"], head,
                               streams=head_streams(data.head_meta["head"]), amp=amp)


def _checkpoint_meta(p: RefineParams, data: _Data) -> dict:
    return {"sources": data.sources, "head": data.head_meta["head"], "head_kwargs": data.head_meta["head_kwargs"],
            "num_classes": len(data.classes), "classes": list(data.classes), "rgb_dim": data.head_meta["rgb_dim"],
            "flow_dim": data.head_meta["flow_dim"], "num_segments": data.head_meta["num_segments"],
            "positions": data.positions, "rgb_size": data.rgb_size, "flow_size": data.flow_size,
            "flow_length": data.flow_length, "params": params_dict(p)}


def load_refine_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[TwoStreamSegmentNet, dict]:
    """(model, checkpoint dict) from a ``best.pt`` / ``last.pt`` written by this stage."""
    ckpt = T.load_checkpoint(path)
    src = ckpt["sources"]
    backbones = {s: create_backbone(src[s]["arch"], num_classes=0, in_channels=src[s]["in_channels"])
                 for s in STREAMS}
    head = create_head(ckpt["head"], num_classes=ckpt["num_classes"], rgb_dim=ckpt["rgb_dim"],
                       flow_dim=ckpt["flow_dim"], num_segments=ckpt["num_segments"], **ckpt["head_kwargs"])
    model = TwoStreamSegmentNet(backbones["rgb"], backbones["flow"], head, streams=head_streams(ckpt["head"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """SGD groups: weight decay on conv (2-D and the head's 1-D) and linear weights, none on biases and
    BatchNorm parameters (tsn-pytorch ``get_optim_policies``); frozen parameters are left out."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, q in module.named_parameters(recurse=False):
            if q.requires_grad:
                is_weight = name == "weight" and isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
                (decay if is_weight else no_decay).append(q)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------------
# One epoch, evaluation
# ----------------------------------------------------------------------------------------------------------

def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def micro_batches(b: int, micro_batch: int) -> list[slice]:
    """``ceil(b / micro_batch)`` contiguous slices of ``range(b)`` of near-equal sizes (at most ``micro_batch``):
    10 videos in micro-batches of 4 are 3 + 3 + 4, not 4 + 4 + 2, so no micro-batch's BatchNorm statistics come
    from needlessly few videos."""
    k = -(-b // micro_batch)
    edges = [(i * b) // k for i in range(k + 1)]
    return [slice(edges[i], edges[i + 1]) for i in range(k)]


class FullBatches(T.EpochBatches):
    """:class:`pipeline.training.loop.EpochBatches` without the last, incomplete global batch of an epoch when there are
    complete ones (the drop_last of TSN's training loader): a step on a few videos would take BatchNorm
    statistics from one or two videos per rank, whose segments can be nearly identical."""

    def global_batches(self) -> list[np.ndarray]:
        batches = super().global_batches()
        if len(batches) > 1 and len(batches[-1]) < self.batch_size:
            batches = batches[:-1]
        return batches


def train_one_epoch(net: nn.Module, loader, optimizer: torch.optim.Optimizer, *, device: torch.device,
                    micro_batch: int, progress=None) -> dict:
    """One pass of SGD; every step is one global batch, each rank's slice in micro-batches.

    ``loader`` yields this rank's slice of a global batch, ``{"rgb": (b, N, 3, H, W), "flow": (b, N, 2L, H,
    W) uint8, "label": (b,)}``, cut by :func:`micro_batches`. The micro-batch losses (means) are weighted by
    ``size * world / global batch`` and their gradients accumulate (DDP synchronises on the last micro-batch
    only), so a step follows the gradient of the global batch's mean loss. Returns ``loss`` (mean over
    samples), ``samples``, ``seconds``, ``data_seconds``.
    """
    world = _world()
    ddp = isinstance(net, nn.parallel.DistributedDataParallel)
    known = T.global_batch_sizes(loader) if world > 1 else None
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)  # read once per epoch: no sync per step
    samples = 0
    t0 = t_wait = time.perf_counter()
    data_s = 0.0
    for batch in loader:
        data_s += time.perf_counter() - t_wait
        b = batch["label"].shape[0]
        global_b = T.global_batch_size(b, known, world)
        optimizer.zero_grad(set_to_none=True)
        chunks = micro_batches(b, micro_batch)
        for k, sl in enumerate(chunks):
            rgb = batch["rgb"][sl].to(device, non_blocking=True)
            flow = batch["flow"][sl].to(device, non_blocking=True)
            y = batch["label"][sl].to(device, non_blocking=True)
            sync = contextlib.nullcontext() if (not ddp or k == len(chunks) - 1) else net.no_sync()
            with sync:
                loss = net(rgb, flow, y)
                (loss * T.loss_scale(y.shape[0] * world, global_b)).backward()
            loss_acc += loss.detach().double() * y.shape[0]
            samples += y.shape[0]
        optimizer.step()
        if progress is not None:
            progress(b)
        t_wait = time.perf_counter()
    totals = torch.tensor([loss_acc.item(), samples], dtype=torch.float64)  # loss sum, samples
    if world > 1:
        torch.distributed.all_reduce(totals)
    n = max(totals[1].item(), 1.0)
    check_finite_loss(totals[0].item() / n, "this epoch")
    return {"loss": totals[0].item() / n, "samples": int(totals[1]), "seconds": time.perf_counter() - t0,
            "data_seconds": data_s}


@torch.no_grad()
def predict(model: TwoStreamSegmentNet, loader, num_videos: int, num_classes: int, *, device: torch.device,
            chunk: int = 32, progress=None) -> torch.Tensor:
    """(V, C) float32 class probabilities averaged over each video's test sequences.

    ``loader`` yields :class:`~pipeline.data.paired.PairedTestSequences` items (``batch_size=None``) for this
    rank's share of the videos; the features of a video's U distinct inputs are computed once (in chunks of
    ``chunk``), gathered into its ``num_test`` sequences of N segments and fused by the head. Results are
    summed over ranks (each video is scored by one rank). Leaves the model in eval mode.
    """
    model.eval()
    out = torch.zeros(num_videos, num_classes + 1, dtype=torch.float64)
    for item in loader:
        feats = []
        for s in STREAMS:
            x = item[s]
            feats.append(torch.cat([model.stream_features(s, x[i:i + chunk].to(device)[None])[0]
                                    for i in range(0, x.shape[0], chunk)]))
        seq = item["sequences"].to(device)  # (num_test, N)
        probs = model.head(feats[0][seq], feats[1][seq]).float().exp()  # (num_test, C)
        idx = int(item["index"])
        out[idx, :num_classes] = probs.mean(0).double().cpu()
        out[idx, -1] = 1
        if progress is not None:
            progress(1)
    if _world() > 1:
        out_dev = out.to(device) if device.type == "cuda" else out
        torch.distributed.all_reduce(out_dev)
        out = out_dev.cpu()
    return out[:, :num_classes].float()


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

def _workers(p: RefineParams, world: int) -> int:
    if p.workers >= 0:
        return p.workers
    return max(0, min(8, (os.cpu_count() or 1) // world - 1))


def _loader(dataset, *, workers: int, device: torch.device, **kw):
    from torch.utils.data import DataLoader

    # Its own generator: creating an iterator must not draw from the global one (dropout's, seeded per epoch).
    return DataLoader(dataset, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, generator=torch.Generator(), **kw)


def _set_train_mode(model: TwoStreamSegmentNet) -> None:
    T.set_train_mode(model, True)
    for s in STREAMS:
        if s not in model.streams:
            getattr(model, s).eval()  # a stream the head ignores is not trained, BN statistics included


def _fit(p: RefineParams, data: _Data, device: torch.device, info: T.DistInfo, out: Path, ckpt: dict | None,
         log) -> dict:
    main = info.is_main
    meta = _checkpoint_meta(p, data)
    model = build_model(data, amp=p.amp)
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
    optimizer = torch.optim.SGD(param_groups(model, p.weight_decay), lr=p.lr, momentum=p.momentum)
    # [STFN] §4.2: divide the learning rate by 10 when the validation error saturates.
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=p.patience)
    net: nn.Module = model
    if info.distributed:
        # BatchNorm statistics are per micro-batch on each rank (no collective in forward: ranks may run
        # different numbers of micro-batches in a step); rank 0's running statistics are saved.
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)
    history: list[dict] = []
    best = {"epoch": 0, "val_acc": -1.0, "val_loss": math.inf}
    start, decays, done = 0, 0, p.epochs == 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        history, best = list(ckpt["history"]), dict(ckpt["best"])
        start, decays, done = int(ckpt["epoch"]), int(ckpt["lr_decays"]), bool(ckpt["done"])

    workers = _workers(p, info.world_size)
    flow_kw = {"flow_length": data.flow_length, "flow_bound": data.flow_bound, "flow_step": data.flow_step,
               "rgb_size": data.rgb_size, "flow_size": data.flow_size}
    n = model.num_segments
    train_set = PairedClips(data.frames, data.flows, data.train, num_segments=n, seed=p.seed, **flow_kw)
    batches = FullBatches(len(train_set), p.batch_size, seed=p.seed, rank=info.rank, world_size=info.world_size)
    train_loader = _loader(train_set, workers=workers, device=device, batch_sampler=batches)

    def sequences(videos: VideoList):
        ds = PairedTestSequences(data.frames, data.flows, videos, num_segments=n, num_positions=data.positions,
                                 num_test=p.num_test, **flow_kw)
        mine = list(range(info.rank, len(videos), info.world_size))
        return _loader(ds, workers=min(workers, len(mine)), device=device, batch_size=None, sampler=mine)

    val_loader = sequences(data.val) if len(data.val) else None
    bar = None
    if main and not done:
        from tqdm import tqdm

        per_epoch = sum(len(b) for b in batches.global_batches())
        bar = tqdm(total=(p.epochs - start) * per_epoch, desc=f"refine {p.head_name}", unit="video",
                   dynamic_ncols=True, file=sys.stderr, disable=None)

    def validate() -> tuple[float, float]:
        probs = predict(model, val_loader, len(data.val), len(data.classes), device=device,
                        chunk=max(p.micro_batch * n, 1))
        labels = torch.tensor(data.val.labels)
        return (float((probs.argmax(1) == labels).float().mean()),
                float(F.nll_loss(probs.clamp_min(1e-12).log(), labels)))

    if ckpt is None:
        # The starting point (backbones + head as trained separately) is the best so far until an epoch
        # beats it on validation; with --epochs 0 it is what gets tested.
        if val_loader is not None:
            acc, loss = validate()
            best = {"epoch": 0, "val_acc": acc, "val_loss": loss}
        if main:
            T.save_checkpoint(out / "best.pt", {**meta, "model": model.state_dict(), "epoch": 0,
                                                "metrics": {"val_acc": best["val_acc"], "val_loss": best["val_loss"]}})
    start_val = dict(ckpt["start_val"]) if ckpt is not None else dict(best)
    epoch = start
    while not done and epoch < p.epochs:
        T.seed_epoch(p.seed, epoch, info.rank)
        batches.set_epoch(epoch)
        _set_train_mode(model)
        lr = optimizer.param_groups[0]["lr"]
        st = train_one_epoch(net, train_loader, optimizer, device=device, micro_batch=p.micro_batch,
                             progress=(lambda k: bar.update(k * info.world_size)) if bar is not None else None)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": st["loss"], "val_loss": None, "val_acc": None,
               "seconds": round(st["seconds"], 3), "data_seconds": round(st["data_seconds"], 3),
               "videos_per_s": round(st["samples"] / max(st["seconds"], 1e-9), 3)}
        if val_loader is not None:
            row["val_acc"], row["val_loss"] = validate()
        epoch, decays, best, improved, done = T.end_epoch(
            row, history, best, epoch=epoch, decays=decays, lr=lr, scheduler=scheduler, optimizer=optimizer,
            max_epochs=p.epochs, max_decays=p.lr_decays)
        if main:
            T.save_epoch(out, {**meta, "model": model.state_dict(), "epoch": epoch, "metrics": row},
                         {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "best": best,
                          "start_val": start_val, "lr_decays": decays, "done": done}, history, improved=improved)
            val = f", val acc {row['val_acc']:.3f} loss {row['val_loss']:.3f}" if row["val_acc"] is not None else ""
            log.info("epoch %d: lr %.0e, train loss %.3f%s, %.2f videos/s (%.0f%% waiting for data)", epoch, lr,
                     st["loss"], val, row["videos_per_s"], 100 * st["data_seconds"] / max(st["seconds"], 1e-9))
    if bar is not None:
        bar.close()

    # Test with the best weights (written by rank 0; the other ranks wait for the file).
    if info.distributed:
        torch.distributed.barrier()
    model.load_state_dict(T.load_checkpoint(out / "best.pt")["model"])
    probs = predict(model, sequences(data.test), len(data.test), len(data.classes), device=device,
                    chunk=max(p.micro_batch * n, 1))
    return {"history": history, "best": best, "start_val": start_val, "probs": probs, "epochs": epoch,
            "decays": decays, "grad_checkpoint": use_ckpt}


#: What a checkpoint left by a killed run must share with this run to be resumed.
RESUME_KEYS = ("sources", "head", "num_classes", "classes", "num_segments")


def run(ctx: StageContext, plan: Plan) -> dict:
    from pipeline.eval.plots import confusion_matrix_plot, training_curves

    p: RefineParams = ctx.params
    data: _Data = plan.data
    info = T.DistInfo(ctx.rank, ctx.world_size, dist.local_rank())
    device = torch.device(dist.device(p.device))
    meta = _checkpoint_meta(p, data)
    ckpt = T.resume_checkpoint(ctx.dir / "last.pt", meta, RESUME_KEYS, is_main=info.is_main, log=ctx.log)
    t0 = time.perf_counter()
    res = _fit(p, data, device, info, ctx.dir, ckpt, ctx.log)
    if not info.is_main:
        return {}
    seconds = time.perf_counter() - t0

    ts = TestScores(res["probs"].numpy(), np.array(data.test.video_ids), np.array(data.test.labels), data.classes)
    ev = evaluate(ts.scores, ts.labels, data.classes)
    save_test_scores(ctx.dir / "test_scores.npz", ts)
    for vid, label, pred in zip(data.test.video_ids, ts.labels, ts.scores.argmax(1)):
        ctx.journal.record_ok(vid, label=int(label), pred=int(pred))
    head_only = data.head_only
    comparison = {
        "head_only": {"top1": head_only["top1"], "mean_class_accuracy": head_only["mean_class_accuracy"],
                      "source": f"{artifacts.head_key(p.head_name, p.split, p.backbone)}/results.json"},
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
    write_json_atomic(ctx.dir / "results.json", results)
    if res["history"]:
        training_curves(res["history"], ctx.dir / "curves.png", title=_key(p))
    confusion_matrix_plot(ev.confusion, data.classes, ctx.dir / "confusion.png",
                          title=f"{_key(p)}: top-1 {100 * ev.top1:.1f}%")
    line = (f"{_key(p)}: top-1 {100 * ev.top1:.1f}%, mean class accuracy {100 * ev.mean_class_accuracy:.1f}% "
            f"on {len(data.test)} test videos (head only -> refined: top-1 {100 * head_only['top1']:.1f}% -> "
            f"{100 * ev.top1:.1f}%, {100 * comparison['delta_top1']:+.1f}); {res['epochs']} epochs, best "
            f"{best['epoch']}, {seconds:.0f} s on {device}")
    ctx.log.info(line)
    return {"line": line, "top1": ev.top1, "mean_class_accuracy": ev.mean_class_accuracy,
            "head_only_top1": head_only["top1"], "delta_top1": comparison["delta_top1"], "epochs": res["epochs"],
            "best_epoch": best["epoch"], "test_videos": len(data.test), "seconds": seconds}


STAGE = Stage(
    name="refine", version=VERSION, params_type=RefineParams, plan=plan, run=run, upstream=_upstream, key=_key,
    help="Train both backbones and a trained head end to end ([STFN] §4.2, second training step).",
)
