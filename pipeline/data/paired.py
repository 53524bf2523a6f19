"""End-to-end training of both backbones and a temporal head: paired RGB + flow samples and the model.

[STFN] §4.2: "We apply two step training process. We first fix the weights of trained appearance and
motion networks and train only STFN. Then we train the entire networks with same methods described in
Two-stream ConvNets training." The second step needs, per video, the N segment frames *and* the flow stacks
centred on them, with "same augmentations for selected frames and optical flow stacks in an input sequence":
one :class:`~pipeline.data.transforms.CropParams` per sample, applied to the N RGB frames and the N flow stacks.

* :class:`PairedClips`: training samples ``{"rgb": (N, 3, Sa, Sa), "flow": (N, 2L, Sm, Sm), "label",
  "index"}`` uint8, TSN segment frames (:func:`pipeline.data.sampling.train_indices`), keyed by ``(index, epoch)``
  like :class:`pipeline.data.clips.TrainClips` (everything drawn from ``default_rng([seed, epoch, index])``: the
  segment frames, then the crop), so resumed and distributed runs see the same samples.
* :class:`PairedTestSequences`: the head's test protocol (``train-head``) on frames: the ``num_test``
  sequences of :func:`pipeline.training.heads.test_sequences` over the ``P`` feature positions of
  :func:`pipeline.data.sampling.feature_positions`, i.e. the very frames ``extract-features`` computed the head's
  test features at, centre view (:func:`pipeline.data.transforms.center_view`).
* :class:`TwoStreamSegmentNet`: N segments through the shared-weight RGB and flow backbones (TSN style),
  ``forward_features`` -> (B, N, D) per stream, the head fuses them -> (B, C) log-probabilities.
* :func:`enable_gradient_checkpointing`: recompute a backbone's residual stages / Inception blocks in the
  backward pass instead of keeping their activations (BatchNorm running statistics updated once).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from pipeline.data.clips import VideoList, read_flow_stacks, sample_key, sample_rng
from pipeline.training.heads import NUM_TEST, test_sequences
from pipeline.models.backbones import Backbone, normalize_flow, normalize_rgb
from pipeline.data.sampling import feature_positions, train_indices
from pipeline.io.store import VideoStore
from pipeline.data.transforms import CROP_SCALES, apply_crop, center_view, sample_crop_params

__all__ = ["PairedClips", "PairedTestSequences", "TwoStreamSegmentNet", "enable_gradient_checkpointing",
           "head_streams", "sequence_frames"]


def _read_rgb(store: VideoStore, video_id: str, frames: Sequence[int]) -> Tensor:
    """(k, 3, H, W) uint8, contiguous."""
    with store.reader(video_id) as r:
        return r.read_images("frames", list(frames)).permute(0, 3, 1, 2).contiguous()


class PairedClips(Dataset):
    """Training samples of both streams: N TSN segment frames and the flow stacks centred on them.

    Args:
        frames, flows: the frame store (``decode``) and the flow store (``extract-flow``).
        videos: the training videos.
        num_segments: N (the head's).
        rgb_size, flow_size: network input sides of the two backbones (the crop is resized to each).
        flow_length: L, flow fields per stack ([STFN] §4.2: 10).
        seed: base seed of the per-sample generators.
        scales, base_size: crop sizes of :func:`pipeline.data.transforms.sample_crop_params`.
        flow_bound, flow_step: when given, every flow container's attributes must match.

    ``dataset[(index, epoch)]`` returns ``{"rgb": (N, 3, Sa, Sa) uint8, "flow": (N, 2L, Sm, Sm) uint8,
    "label": int, "index": int}``; one crop and flip for all 2N inputs ([STFN] §4.2).
    """

    def __init__(self, frames: VideoStore, flows: VideoStore, videos: VideoList, *, num_segments: int,
                 rgb_size: int = 224, flow_size: int = 224, flow_length: int = 10, seed: int = 0,
                 scales: Sequence[int] = CROP_SCALES, base_size: int = 256, flow_bound: float | None = None,
                 flow_step: int | None = None) -> None:
        if num_segments < 1 or flow_length < 1 or rgb_size < 1 or flow_size < 1:
            raise ValueError(f"num_segments, flow_length and input sizes must be >= 1, got {num_segments}, "
                             f"{flow_length}, {rgb_size}, {flow_size}")
        self.frames, self.flows, self.videos = frames, flows, videos
        self.num_segments, self.rgb_size, self.flow_size = num_segments, rgb_size, flow_size
        self.flow_length, self.seed, self.scales, self.base_size = flow_length, seed, tuple(scales), base_size
        self.flow_bound, self.flow_step = flow_bound, flow_step

    def __len__(self) -> int:
        return len(self.videos)

    def rng(self, index: int, epoch: int) -> np.random.Generator:
        """The generator of sample ``index`` in ``epoch``."""
        return sample_rng(self.seed, index, epoch)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = sample_key(key)
        rng = self.rng(index, epoch)
        vid = self.videos.video_ids[index]
        frames = train_indices(self.videos.num_frames[index], self.num_segments, rng)
        rgb = _read_rgb(self.frames, vid, frames)
        flow = read_flow_stacks(self.flows, vid, frames, self.flow_length, self.flow_bound, self.flow_step)
        if rgb.shape[-2:] != flow.shape[-2:]:
            raise ValueError(f"{vid}: frames are {tuple(rgb.shape[-2:])} but its flow is {tuple(flow.shape[-2:])} "
                             "(H, W); re-run extract-flow on these frames")
        crop = sample_crop_params(rgb.shape[-2], rgb.shape[-1], rng, scales=self.scales, base_size=self.base_size)
        return {"rgb": apply_crop(rgb, crop, self.rgb_size).contiguous(),
                "flow": apply_crop(flow.contiguous(), crop, self.flow_size, is_flow=True).contiguous(),
                "label": int(self.videos.labels[index]), "index": index}


def sequence_frames(num_frames: int, num_positions: int, num_segments: int, num_test: int = NUM_TEST) -> np.ndarray:
    """(num_test, N) frame indices of the head's test sequences for a video of ``num_frames`` frames.

    Sequence ``j`` takes, in every segment, the position of :func:`pipeline.training.heads.test_sequences` over
    ``P = num_positions`` feature positions, and position ``k`` is frame
    :func:`pipeline.data.sampling.feature_positions` ``(num_frames, P)[k]``: the frames whose features the head
    was tested on.
    """
    positions = feature_positions(num_frames, num_positions).astype(np.int64)
    return positions[test_sequences(num_positions, num_segments, num_test).numpy()]


class PairedTestSequences(Dataset):
    """Test (and validation) inputs: the head's ``num_test`` sequences of N frames, centre view.

    Each distinct frame is read and computed once: ``dataset[i]`` returns ``{"rgb": (U, 3, Sa, Sa) uint8,
    "flow": (U, 2L, Sm, Sm) uint8, "sequences": (num_test, N) int64 indices into the U inputs, "label": int,
    "index": int}``.
    """

    __test__ = False  # not a pytest class

    def __init__(self, frames: VideoStore, flows: VideoStore, videos: VideoList, *, num_segments: int,
                 num_positions: int, num_test: int = NUM_TEST, rgb_size: int = 224, flow_size: int = 224,
                 flow_length: int = 10, flow_bound: float | None = None, flow_step: int | None = None) -> None:
        test_sequences(num_positions, num_segments, num_test)  # validates P >= N, num_test >= 1
        self.frames, self.flows, self.videos = frames, flows, videos
        self.num_segments, self.num_positions, self.num_test = num_segments, num_positions, num_test
        self.rgb_size, self.flow_size, self.flow_length = rgb_size, flow_size, flow_length
        self.flow_bound, self.flow_step = flow_bound, flow_step

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict:
        vid = self.videos.video_ids[index]
        seq = sequence_frames(self.videos.num_frames[index], self.num_positions, self.num_segments, self.num_test)
        unique, inverse = np.unique(seq, return_inverse=True)
        frames = unique.tolist()
        rgb = center_view(_read_rgb(self.frames, vid, frames), self.rgb_size)
        flow = read_flow_stacks(self.flows, vid, frames, self.flow_length, self.flow_bound, self.flow_step)
        return {"rgb": rgb.contiguous(), "flow": center_view(flow.contiguous(), self.flow_size).contiguous(),
                "sequences": torch.from_numpy(inverse.reshape(seq.shape).astype(np.int64)),
                "label": int(self.videos.labels[index]), "index": int(index)}


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------

def head_streams(head_name: str) -> tuple[str, ...]:
    """The streams a head reads: the single-stream baselines read one, every other head both."""
    return (head_name,) if head_name in ("rgb", "flow") else ("rgb", "flow")


class TwoStreamSegmentNet(nn.Module):
    """N segments through shared-weight RGB and flow backbones, fused by a temporal head ([STFN] §4.2).

    Args:
        rgb, flow: the appearance and motion backbones (:class:`pipeline.models.backbones.Backbone`).
        head: a temporal head (:func:`pipeline.models.heads.create_head`) with ``rgb_dim`` / ``flow_dim``
            equal to the backbones' ``num_features``.
        streams: the streams the head reads (:func:`head_streams`); a stream it ignores is not computed
            (its features are zeros) and its backbone is frozen.
        amp: bf16 autocast of the backbones on CUDA (the head runs in float32).

    ``forward(rgb (B, N, 3, H, W) uint8, flow (B, N, 2L, H', W') uint8)`` -> (B, C) log-probabilities;
    ``forward(rgb, flow, target)`` -> the head's training loss (its ``loss``: NLL, or the per-stream sum of
    the late / TSN baselines), so that DistributedDataParallel sees the whole computation.
    """

    def __init__(self, rgb: Backbone, flow: Backbone, head: nn.Module, *, streams: Sequence[str] = ("rgb", "flow"),
                 amp: bool = False) -> None:
        super().__init__()
        if rgb.num_features != head.rgb_dim or flow.num_features != head.flow_dim:
            raise ValueError(f"the head takes rgb {head.rgb_dim}-d and flow {head.flow_dim}-d features, the "
                             f"backbones give {rgb.num_features}-d ({rgb.arch}) and {flow.num_features}-d "
                             f"({flow.arch})")
        if not streams or any(s not in ("rgb", "flow") for s in streams):
            raise ValueError(f"streams must be a non-empty subset of ('rgb', 'flow'), got {tuple(streams)}")
        self.rgb, self.flow, self.head = rgb, flow, head
        self.streams, self.amp = tuple(streams), amp
        for s in ("rgb", "flow"):
            if s not in self.streams:
                getattr(self, s).requires_grad_(False)

    @property
    def num_segments(self) -> int:
        return self.head.num_segments

    def stream_features(self, stream: str, x: Tensor) -> Tensor:
        """``(B, N, C, H, W)`` uint8 -> ``(B, N, D)`` float32 pooled features of one backbone."""
        backbone: Backbone = getattr(self, stream)
        b, n = x.shape[:2]
        if stream not in self.streams:
            return torch.zeros(b, n, backbone.num_features, device=x.device)
        flat = (normalize_rgb if stream == "rgb" else normalize_flow)(x.flatten(0, 1))
        if flat.device.type == "cuda":
            flat = flat.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=flat.device.type, dtype=torch.bfloat16,
                            enabled=self.amp and flat.device.type == "cuda"):
            feats = backbone.forward_features(flat)
        return feats.float().view(b, n, -1)

    def forward(self, rgb: Tensor, flow: Tensor, target: Tensor | None = None) -> Tensor:
        a, m = self.stream_features("rgb", rgb), self.stream_features("flow", flow)
        return self.head(a, m) if target is None else self.head.loss(a, m, target)


# ----------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _running_stats_kept(module: nn.Module):
    """BatchNorm layers of ``module`` leave their running statistics untouched (the recomputation)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, count) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _checkpointed(module: nn.Module, forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _running_stats_kept(module)), **kwargs)

    return run


def enable_gradient_checkpointing(backbone: Backbone) -> int:
    """Recompute every residual stage (ResNet ``layer1..4``) or Inception block (``Mixed_*``) of ``backbone``
    in the backward pass instead of storing its activations; returns how many blocks were wrapped.

    Activations inside a block are freed after the forward pass, at the cost of a second forward of the
    block during backward (about a third more compute). The recomputation leaves BatchNorm running statistics
    as they were, so results and buffers equal those without checkpointing. The state dict is unchanged
    (the blocks' ``forward`` is wrapped in place).
    """
    n = 0
    for name, child in backbone.trunk.named_children():
        if name.startswith(("layer", "Mixed_")) and not getattr(child, "_grad_checkpointed", False):
            child.forward = _checkpointed(child, child.forward)
            child._grad_checkpointed = True
            n += 1
    return n
