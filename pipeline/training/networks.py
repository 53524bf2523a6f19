"""Training and testing an end-to-end network of :data:`pipeline.models.networks.NETWORKS` (``train-net``).

On top of the one loop of :mod:`pipeline.training.loop` (``fit``, ``train_one_epoch`` in micro-batches,
resume from ``last.pt``, ``best.pt`` on validation, history, TensorBoard, the plateau or step schedule) this
module adds what every end-to-end network shares, whatever its inputs:

* :data:`INPUTS`: the stored inputs a network may read (decode's ``frames``, extract-flow's ``flow``), which
  stage writes each and how to open it;
* :data:`READERS`: the data adapters, each turning one *sample* of a network's sampling rule (e.g. the 5
  frame indices of an [ST-Mult] clip) into the uint8 tensors of its batch dict at the stored resolution, with
  the kind (``rgb`` or ``flow``) of every entry, which picks its normalisation and how it flips;
* :class:`NetworkClips` (training: the network's ``train_sample``, then ONE crop and flip for every frame and
  flow stack of the sample, :func:`pipeline.data.transforms.sample_crop_params`, drawn from the sample's own
  generator so that resumed and distributed runs see the same data) and :class:`NetworkViews` (validation and
  test: the network's ``eval_samples`` x its spatial views, :func:`pipeline.data.transforms.eval_spatial_views`);
* :func:`network_loss` (the network's own ``loss`` as a :data:`pipeline.training.loop.LossFn`),
  :func:`predict` (each video's views through the network, its ``class_scores`` averaged) and
  :func:`train_network`, the whole run: DDP under ``torchrun``, micro-batches, validation on decode's
  hold-out, then the test videos with the best weights.

A video that cannot be read at test time is reported with its reason (:func:`predict` returns it) rather
than stopping the run; :func:`probe_videos` finds the unreadable and too-short ones before training.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from pipeline.data.clips import VideoList, read_stream, sample_key, sample_rng
from pipeline.data.transforms import CROP_SCALES, apply_crop, eval_spatial_views, sample_crop_params
from pipeline.io import artifacts
from pipeline.io.store import VideoStore
from pipeline.models.backbones import normalize_flow, normalize_rgb
from pipeline.models.networks import NetworkSpec
from pipeline.training import loop as T

__all__ = ["INPUTS", "READERS", "Inputs", "NetworkClips", "NetworkViews", "Reader", "network_loss", "predict",
           "probe_videos", "read_clip", "train_network"]


# ----------------------------------------------------------------------------------------------------------
# Stored inputs and readers (the data adapters)
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputKind:
    """A stored input: ``key(split, backbone)`` is the output holding it, ``open(folder)`` opens its store."""

    key: Callable[[int, str], str]
    open: Callable[[Path], Any]


#: input name -> where it is stored. A network lists the ones it reads in ``NetworkSpec.inputs``.
INPUTS: dict[str, InputKind] = {
    "frames": InputKind(lambda split, backbone: artifacts.DECODE, artifacts.frame_store),
    "flow": InputKind(lambda split, backbone: artifacts.FLOW, artifacts.flow_store),
}


@dataclass(frozen=True)
class Inputs:
    """The opened stores a reader reads (by input name) and the flow stacks' settings: L fields per stack and
    the bound and step extract-flow recorded (every container is checked against them)."""

    stores: Mapping[str, VideoStore]
    flow_length: int = 10
    flow_bound: float | None = None
    flow_step: int | None = None


def read_clip(inputs: Inputs, video_id: str, frames: Sequence[int]) -> dict[str, Tensor]:
    """A clip of T frames and the T flow stacks centred on them ([ST-Mult] §3.1, L = ``flow_length``):
    ``{"rgb": (T, 3, H, W), "flow": (T, 2L, H, W)}`` uint8 at the stored resolution."""
    frames = [int(f) for f in frames]
    rgb = read_stream(inputs.stores["frames"], "rgb", video_id, frames).contiguous()
    flow = read_stream(inputs.stores["flow"], "flow", video_id, frames, inputs.flow_length, inputs.flow_bound,
                       inputs.flow_step)
    if rgb.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"{video_id}: frames are {tuple(rgb.shape[-2:])} but its flow is {tuple(flow.shape[-2:])} "
                         "(H, W); re-run extract-flow on these frames")
    return {"rgb": rgb, "flow": flow}


@dataclass(frozen=True)
class Reader:
    """A data adapter: ``read(inputs, video_id, sample) -> {key: (..., C, H, W) uint8}`` and the kind of every
    key (``rgb``: ImageNet normalisation, plain flip; ``flow``: ``f / bound``, flip negates x)."""

    read: Callable[[Inputs, str, Any], dict[str, Tensor]]
    kinds: Mapping[str, str]


#: ``NetworkSpec.data`` -> its reader.
READERS: dict[str, Reader] = {"clip": Reader(read_clip, {"rgb": "rgb", "flow": "flow"})}

_NORMALIZE = {"rgb": normalize_rgb, "flow": normalize_flow}


def _reader(spec: NetworkSpec) -> Reader:
    try:
        return READERS[spec.data]
    except KeyError:
        raise ValueError(f"no reader {spec.data!r} in pipeline.training.networks.READERS") from None


def probe_videos(inputs: Inputs, videos: VideoList, min_frames: int = 1) -> dict[str, str]:
    """video id -> why it cannot be used, for the videos with fewer than ``min_frames`` frames and those whose
    container in a store is missing or unreadable (opened, image counts read; no pixel decoded)."""
    bad: dict[str, str] = {}
    for vid, n in zip(videos.video_ids, videos.num_frames):
        if n < min_frames:
            bad[vid] = f"too short: {n} frame(s), the network needs at least {min_frames}"
            continue
        for name, store in inputs.stores.items():
            try:
                with store.reader(vid) as r:
                    count = r.num_images(name)  # the image sequences are named as the inputs
                if count < 1:
                    raise ValueError("no images")
            except Exception as e:  # noqa: BLE001 - any unreadable container is this video's failure
                bad[vid] = f"{name} of {store.path(vid)} unreadable ({type(e).__name__}: {e})"
                break
    return bad


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------

def _same_size(x: Mapping[str, Tensor], vid: str) -> tuple[int, int]:
    sizes = {tuple(v.shape[-2:]) for v in x.values()}
    if len(sizes) != 1:
        raise ValueError(f"{vid}: the inputs of one sample differ in size {sorted(sizes)}; one crop cannot fit all")
    return sizes.pop()


class NetworkClips(Dataset):
    """Training samples of a network, keyed ``(index, epoch)`` (:class:`pipeline.training.loop.EpochBatches`).

    Everything is drawn from ``default_rng([seed, epoch, index])`` (:func:`pipeline.data.clips.sample_rng`):
    first the network's ``train_sample`` (e.g. [ST-Mult]'s 5 frames at a random stride), then one multi-scale
    corner crop and flip (:func:`pipeline.data.transforms.sample_crop_params`) applied to every tensor of the
    sample, resized to ``input_size``. ``dataset[(index, epoch)]`` returns the reader's keys (uint8) plus
    ``"label"`` and ``"index"``.
    """

    def __init__(self, spec: NetworkSpec, options: Mapping[str, Any], inputs: Inputs, videos: VideoList, *,
                 input_size: int, seed: int = 0, scales: Sequence[int] = CROP_SCALES, base_size: int = 256) -> None:
        self.spec, self.options, self.reader, self.inputs = spec, dict(options), _reader(spec), inputs
        self.videos, self.input_size, self.seed = videos, input_size, seed
        self.scales, self.base_size = tuple(scales), base_size

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, key) -> dict:
        index, epoch = sample_key(key)
        rng = sample_rng(self.seed, index, epoch)
        vid = self.videos.video_ids[index]
        sample = self.spec.train_sample(self.videos.num_frames[index], rng, self.options)
        x = self.reader.read(self.inputs, vid, sample)
        crop = sample_crop_params(*_same_size(x, vid), rng, scales=self.scales, base_size=self.base_size)
        out: dict = {k: apply_crop(v, crop, self.input_size, is_flow=self.reader.kinds[k] == "flow").contiguous()
                     for k, v in x.items()}
        out.update(label=int(self.videos.labels[index]), index=int(index))
        return out


class NetworkViews(Dataset):
    """Test (``validation=False``) or validation views of one video per item.

    The network's ``eval_samples`` (temporal views: [ST-Mult]'s chunks of the 25 test frames) times its
    spatial views (``eval_space(options)``: [ST-Mult]'s whole frame at short side ``round(input_size * 256 /
    224)`` by default, with its flip at test, without at validation). ``dataset[i]`` returns ``{key: (V, ...)
    uint8, "label", "index"}`` (V views), or ``{"index": i, "error": reason}`` when the video cannot be read, so one bad video
    does not stop the test.
    """

    def __init__(self, spec: NetworkSpec, options: Mapping[str, Any], inputs: Inputs, videos: VideoList, *,
                 input_size: int, validation: bool = False) -> None:
        self.spec, self.options, self.reader, self.inputs = spec, dict(options), _reader(spec), inputs
        self.videos, self.input_size, self.validation = videos, input_size, validation

    def __len__(self) -> int:
        return len(self.videos)

    def views(self, index: int) -> dict[str, Tensor]:
        vid = self.videos.video_ids[index]
        parts: dict[str, list[Tensor]] = {}
        for sample in self.spec.eval_samples(self.videos.num_frames[index], self.options, self.validation):
            for k, v in self.reader.read(self.inputs, vid, sample).items():
                parts.setdefault(k, []).append(eval_spatial_views(
                    v, self.spec.eval_space(self.options), self.input_size, flips=not self.validation,
                    is_flow=self.reader.kinds[k] == "flow"))
        return {k: torch.cat(v).contiguous() for k, v in parts.items()}

    def __getitem__(self, index: int) -> dict:
        try:
            out: dict = self.views(index)
        except (OSError, ValueError, KeyError, RuntimeError, IndexError) as e:
            return {"index": int(index), "error": f"{type(e).__name__}: {e}"}
        out.update(label=int(self.videos.labels[index]), index=int(index))
        return out


# ----------------------------------------------------------------------------------------------------------
# Loss, prediction
# ----------------------------------------------------------------------------------------------------------

def _inputs_on(batch: Mapping[str, Any], kinds: Mapping[str, str], device: torch.device) -> dict[str, Tensor]:
    return {k: _NORMALIZE[kind](batch[k].to(device, non_blocking=True)) for k, kind in kinds.items()}


def network_loss(model: nn.Module, kinds: Mapping[str, str], amp: bool = False) -> T.LossFn:
    """:data:`pipeline.training.loop.LossFn` of a network: its batch dict normalised on the device, forward
    (bf16 autocast on CUDA with ``amp``), the network's own ``loss`` (e.g. [ST-Mult]'s sum of two
    cross-entropies) times the micro-batch size, the count its ``class_scores`` classify right.
    ``model`` is the bare network (``net`` may be its DDP wrapper)."""

    def loss_fn(net: nn.Module, batch: dict, device: torch.device):
        y = batch["label"].to(device, non_blocking=True)
        x = _inputs_on(batch, kinds, device)
        with T.autocast(device, amp):
            out = net(x)
        out = {k: v.float() for k, v in out.items()}
        b = y.shape[0]
        correct = (model.class_scores(out).argmax(1) == y).sum()
        return model.loss(out, y) * b, correct, b

    return loss_fn


@torch.no_grad()
def predict(model: nn.Module, loader, num_videos: int, num_classes: int, kinds: Mapping[str, str], *,
            device: torch.device, amp: bool = False, chunk: int = 4,
            progress: Callable[[int], Any] | None = None) -> tuple[Tensor, Tensor, dict[int, str]]:
    """Class probabilities of videos from :class:`NetworkViews` items (``batch_size=None``, this rank's share).

    Each video's V views go through the network ``chunk`` at a time; its ``class_scores`` (the network's
    fusion rule) are averaged over the views ([ST-Mult] §4.2: "we average the predictions ... over all
    spatiotemporal locations"). Returns ((V, C) float32 probabilities, (V,) bool scored, {index: reason} of
    this rank's videos that could not be read), the first two summed over ranks. Leaves the model in eval mode.
    """
    model.eval()
    out = torch.zeros(num_videos, num_classes + 1, dtype=torch.float64)
    failed: dict[int, str] = {}
    for item in loader:
        idx = int(item["index"])
        if "error" in item:
            failed[idx] = str(item["error"])
        else:
            n = item[next(iter(kinds))].shape[0]
            scores = []
            for i in range(0, n, chunk):
                x = _inputs_on({k: item[k][i:i + chunk] for k in kinds}, kinds, device)
                with T.autocast(device, amp):
                    o = model(x)
                scores.append(model.class_scores({k: v.float() for k, v in o.items()}).double().cpu())
            out[idx, :num_classes] = torch.cat(scores).mean(0)
            out[idx, -1] = 1
        if progress is not None:
            progress(1)
    out = T.sum_over_ranks(out, device)
    return out[:, :num_classes].float(), out[:, -1] > 0, failed


def _val_metrics(probs: Tensor, scored: Tensor, labels: Sequence[int]) -> tuple[float, float]:
    if not bool(scored.any()):
        return 0.0, math.inf
    keep = scored.nonzero().flatten()
    return T.val_metrics(probs[keep], [labels[i] for i in keep.tolist()])


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainSettings:
    """What ``train-net`` sets of a run (its parameters), besides the network and its options."""

    input_size: int
    batch_size: int
    micro_batch: int
    schedule: T.Schedule
    workers: int = 0
    amp: bool = True
    tensorboard: bool = False
    name: str = "train-net"


@dataclass
class RunResult:
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    probs: Tensor | None = None
    scored: Tensor | None = None
    failed: dict[int, str] = field(default_factory=dict)
    epochs: int = 0
    decays: int = 0


def train_network(model: nn.Module, spec: NetworkSpec, options: Mapping[str, Any], inputs: Inputs, *,
                  train: VideoList, val: VideoList, test: VideoList, num_classes: int, settings: TrainSettings,
                  device: torch.device, info: T.DistInfo, out: Path, meta: dict, ckpt: dict | None,
                  log) -> RunResult:
    """Train ``model`` (resuming from ``ckpt``, a killed run's ``last.pt``) with :func:`pipeline.training.loop.fit`,
    then score the test videos with the best weights.

    Each step is one global batch of ``batch_size`` videos ([ST-Mult] §4.1: 128), each rank's part cut into
    micro-batches of ``micro_batch`` videos whose gradients accumulate (BatchNorm statistics per micro-batch,
    as the authors: 4 videos); under DDP (``torchrun``) each rank takes its slice of every global batch, the
    BatchNorm statistics stay per micro-batch and rank (no collective in forward), rank 0's running statistics
    are saved. Validation after each epoch on ``val`` (decode's hold-out) picks ``best.pt``.
    """
    reader = _reader(spec)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    net: nn.Module = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)
    workers = T.auto_workers(settings.workers, info.world_size)
    train_set = NetworkClips(spec, options, inputs, train, input_size=settings.input_size,
                             seed=settings.schedule.seed)
    batches = T.EpochBatches(len(train_set), settings.batch_size, seed=settings.schedule.seed, rank=info.rank,
                             world_size=info.world_size)
    train_loader = T.make_loader(train_set, workers=workers, device=device, batch_sampler=batches)

    def views(videos: VideoList, validation: bool):
        ds = NetworkViews(spec, options, inputs, videos, input_size=settings.input_size, validation=validation)
        mine = T.rank_share(len(videos), info)
        return T.make_loader(ds, workers=min(workers, len(mine)), device=device, batch_size=None, sampler=mine)

    pred_kw = {"device": device, "amp": settings.amp, "chunk": max(settings.micro_batch, 1)}
    val_loader = views(val, True) if len(val) else None

    def validate() -> tuple[float, float]:
        probs, scored, _ = predict(model, val_loader, len(val), num_classes, reader.kinds, **pred_kw)
        return _val_metrics(probs, scored, val.labels)

    loss_fn = network_loss(model, reader.kinds, settings.amp)
    res = T.fit(model, lambda opt, progress: T.train_one_epoch(net, train_loader, opt, device=device,
                                                                loss_fn=loss_fn, micro_batch=settings.micro_batch,
                                                                progress=progress),
                schedule=settings.schedule, batches=batches, validate=validate if val_loader is not None else None,
                out=out, meta=meta, ckpt=ckpt, info=info, log=log, net=net,
                rate=("videos_per_s", "samples", "videos"), desc=settings.name, unit="video",
                tensorboard=settings.tensorboard)
    probs, scored, failed = predict(model, views(test, False), len(test), num_classes, reader.kinds, **pred_kw)
    return RunResult(history=res.history, best=res.best, probs=probs, scored=scored, failed=failed,
                     epochs=res.epochs, decays=res.decays)
