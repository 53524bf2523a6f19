"""End-to-end training of both backbones and a temporal head: paired RGB + flow samples.

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
  sequences of :func:`pipeline.data.sampling.eval_sequences` over the ``P`` feature positions of
  :func:`pipeline.data.sampling.feature_positions`, i.e. the very frames ``extract-features`` computed the head's
  test features at, centre view (:func:`pipeline.data.transforms.center_view`).

The network these samples feed is :class:`pipeline.models.two_stream.TwoStreamSegmentNet`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from pipeline.data.clips import SegmentSamples, VideoList, read_flow_stacks
from pipeline.data.sampling import NUM_TEST, eval_sequences, feature_positions
from pipeline.io.store import VideoStore
from pipeline.data.transforms import CROP_SCALES, apply_crop, center_view, sample_crop_params

__all__ = ["PairedClips", "PairedTestSequences", "sequence_frames"]


def _read_rgb(store: VideoStore, video_id: str, frames: Sequence[int]) -> Tensor:
    """(k, 3, H, W) uint8, contiguous."""
    with store.reader(video_id) as r:
        return r.read_images("frames", list(frames)).permute(0, 3, 1, 2).contiguous()


class PairedClips(SegmentSamples):
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

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, rng, vid, frames = self.draw(key)
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

    Sequence ``j`` takes, in every segment, the position of :func:`pipeline.data.sampling.eval_sequences` over
    ``P = num_positions`` feature positions, and position ``k`` is frame
    :func:`pipeline.data.sampling.feature_positions` ``(num_frames, P)[k]``: the frames whose features the head
    was tested on.
    """
    positions = feature_positions(num_frames, num_positions).astype(np.int64)
    return positions[eval_sequences(num_positions, num_segments, num_test)]


class PairedTestSequences(Dataset):
    """Test (and validation) inputs: the head's ``num_test`` sequences of N frames, centre view.

    Each distinct frame is read and computed once: ``dataset[i]`` returns ``{"rgb": (U, 3, Sa, Sa) uint8,
    "flow": (U, 2L, Sm, Sm) uint8, "sequences": (num_test, N) int64 indices into the U inputs, "label": int,
    "index": int}``.
    """

    def __init__(self, frames: VideoStore, flows: VideoStore, videos: VideoList, *, num_segments: int,
                 num_positions: int, num_test: int = NUM_TEST, rgb_size: int = 224, flow_size: int = 224,
                 flow_length: int = 10, flow_bound: float | None = None, flow_step: int | None = None) -> None:
        eval_sequences(num_positions, num_segments, num_test)  # validates P >= N, num_test >= 1
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
