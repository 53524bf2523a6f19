"""Torch datasets over the frame and flow stores: TSN training samples and centre-crop test views.

[STFN] §4.2 ("Two-stream ConvNets"): the appearance network takes RGB frames, the motion network a
stack of L = 10 flow fields (2L = 20 channels) centred on the sampled frame; frames come from videos
whose short side is 256; training augmentation is a multi-scale corner crop resized to the input size
plus a horizontal flip, "same augmentations for selected frames and optical flow stacks in an input
sequence". Sampling follows TSN (Wang et al. 2016): the video is cut into N equal segments and one random
frame (or flow stack) is drawn from each; the network's N outputs are averaged (average consensus).
N = 1 is the plain two-stream sampling (one random frame per video per epoch).

Samples are dicts ``{"input": uint8 tensor, "label": int, "index": int}``:

* RGB training input ``(N, 3, S, S)``; flow training input ``(N, 2L, S, S)`` with channels
  ``x0, y0, x1, y1, ...`` (the layout :func:`pipeline.data.transforms.apply_crop` and
  :func:`pipeline.models.backbones.normalize_flow` expect);
* test views ``(T, C, S, S)``: T uniformly spaced frames (:func:`pipeline.data.sampling.eval_indices`), each the
  centre view (:func:`pipeline.data.transforms.center_view`).

Normalisation happens on the training device (:func:`input_normalizer`), so the loader moves uint8.
Inputs are contiguous (N, C, H, W) tensors whichever process builds them: a channels-last view (what
decoding (H, W, C) frames gives) would select other convolution kernels and change results in the last bits.

Determinism: a training sample is keyed by ``(index, epoch)`` (the batch sampler in
:mod:`pipeline.training.loop` yields such keys) and draws everything from
``np.random.default_rng([seed, epoch, index])`` in a fixed order: the segment frames, then the crop. So a
sample's content depends on neither the DataLoader worker that builds it nor the rank that trains on
it, which is what makes resumed and distributed runs repeat a single uninterrupted run.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from pipeline.models.backbones import normalize_flow, normalize_rgb
from pipeline.data.sampling import eval_indices, flow_stack_indices, train_indices
from pipeline.io.store import VideoStore
from pipeline.data.transforms import CROP_SCALES, apply_crop, center_view, sample_crop_params
from pipeline.streams import STREAMS

__all__ = ["STREAMS", "VideoList", "TrainClips", "EvalViews", "input_channels", "input_normalizer",
           "read_flow_stacks", "read_stream"]


def input_channels(stream: str, flow_length: int = 10) -> int:
    """Network input channels: 3 for RGB, 2L for a stack of L flow fields ([STFN] §4.2: 20)."""
    if stream == "rgb":
        return 3
    if stream == "flow":
        return 2 * flow_length
    raise ValueError(f"unknown stream {stream!r}; choose one of {', '.join(STREAMS)}")


def input_normalizer(stream: str) -> Callable[[Tensor], Tensor]:
    """uint8 input -> float network input: ImageNet statistics for RGB, ``f / bound`` for flow."""
    input_channels(stream)
    return normalize_rgb if stream == "rgb" else normalize_flow


@dataclass(frozen=True)
class VideoList:
    """The videos a dataset reads: ids, labels and frame counts, aligned (one row per video)."""

    video_ids: tuple[str, ...]
    labels: tuple[int, ...]
    num_frames: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.video_ids) == len(self.labels) == len(self.num_frames):
            raise ValueError(f"video_ids, labels and num_frames differ in length: {len(self.video_ids)}, "
                             f"{len(self.labels)}, {len(self.num_frames)}")
        bad = [v for v, n in zip(self.video_ids, self.num_frames) if n < 1]
        if bad:
            raise ValueError(f"videos without frames: {', '.join(bad[:5])}")

    def __len__(self) -> int:
        return len(self.video_ids)

    def without(self, video_ids: Collection[str]) -> "VideoList":
        """These videos but ``video_ids``, in the same order."""
        rows = [i for i, v in enumerate(self.video_ids) if v not in video_ids]
        return VideoList(tuple(self.video_ids[i] for i in rows), tuple(self.labels[i] for i in rows),
                         tuple(self.num_frames[i] for i in rows))

    @classmethod
    def of(cls, table, rows: Sequence[int]) -> "VideoList":
        """The rows ``rows`` of a :class:`pipeline.data.table.VideoTable`."""
        return cls(tuple(table.video_ids[i] for i in rows), tuple(table.labels[i] for i in rows),
                   tuple(table.num_frames[i] for i in rows))


@dataclass(frozen=True)
class SplitVideos:
    """The videos of one split a network is fitted, validated and tested on."""

    train: VideoList
    val: VideoList  # the one hold-out decode recorded in the video table (pipeline.data.splits)
    test: VideoList

    def without(self, video_ids: Collection[str]) -> "SplitVideos":
        """The split without ``video_ids`` (e.g. the videos extract-flow failed); ValueError when no training or
        no test video is left."""
        out = SplitVideos(*(v.without(video_ids) for v in (self.train, self.val, self.test)))
        if not len(out.train) or not len(out.test):
            raise ValueError(f"without {len(video_ids)} video(s), {len(out.train)} training and {len(out.test)} test "
                             "videos are left; both are needed")
        return out


def split_videos(table, split: int) -> SplitVideos:
    """Split ``split`` of a video table as ``train`` / ``val`` / ``test`` video lists, for every stage that
    trains a network (finetune, refine). ValueError (naming the problem) when the split is not in the table,
    when it lacks training or test videos, or when a test class has no training video."""
    try:
        membership = table.split_of(split)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    rows = {w: [i for i, s in enumerate(membership) if s == w] for w in ("train", "val", "test")}
    if not rows["train"] or not rows["test"]:
        raise ValueError(f"split {split} has {len(rows['train'])} training and {len(rows['test'])} test videos "
                         "(after the validation hold-out); both are needed")
    absent = sorted({table.labels[i] for i in rows["test"]} - {table.labels[i] for i in rows["train"]})
    if absent:
        names = ", ".join(table.classes[c] for c in absent[:10])
        raise ValueError(f"split {split}: {len(absent)} class(es) of the test split have no training video "
                         f"({names}); a network cannot learn them")
    return SplitVideos(*(VideoList.of(table, rows[w]) for w in ("train", "val", "test")))


def read_flow_stacks(store: VideoStore, video_id: str, centers: Sequence[int], flow_length: int,
                     bound: float | None = None, step: int | None = None) -> Tensor:
    """Flow stacks of ``flow_length`` fields centred on frames ``centers`` (clamped at the ends).

    Reads image sequence ``flow`` ((T - step, H, W, 2) uint8) of the video's container and, when given,
    checks the container's ``bound`` and ``step`` attributes against the requested ones.

    Returns:
        ``(len(centers), 2L, H, W)`` uint8, channels ``x0, y0, x1, y1, ...``.
    """
    with store.reader(video_id) as r:
        attrs = r.attrs
        for name, want in (("bound", bound), ("step", step)):
            if want is not None and attrs.get(name) is not None and float(attrs[name]) != float(want):
                raise ValueError(f"{store.path(video_id)}: flow stored with {name} {attrs[name]}, but {name} "
                                 f"{want} was requested; re-run extract-flow or change --flow-{name}")
        num_flows = r.num_images("flow")
        # A centre past the last flow (possible with step > 1) uses the last full window.
        idx = [j for c in centers for j in flow_stack_indices(min(int(c), num_flows), num_flows, flow_length)]
        q = r.read_images("flow", idx)  # (k * L, H, W, 2)
    k, h, w = len(centers), q.shape[1], q.shape[2]
    return q.view(k, flow_length, h, w, 2).permute(0, 1, 4, 2, 3).reshape(k, 2 * flow_length, h, w)


def read_stream(store: VideoStore, stream: str, video_id: str, frames: Sequence[int], flow_length: int = 10,
                bound: float | None = None, step: int | None = None) -> Tensor:
    """``(k, C, H, W)`` uint8 frames (RGB, a channels-last view) or flow stacks centred on ``frames``
    (:func:`read_flow_stacks`)."""
    if stream == "rgb":
        with store.reader(video_id) as r:
            return r.read_images("frames", frames).permute(0, 3, 1, 2)
    return read_flow_stacks(store, video_id, frames, flow_length, bound, step).contiguous()


def sample_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """A training dataset's key: ``(index, epoch)`` as given by :class:`pipeline.training.loop.EpochBatches`, or an
    index alone (epoch 0)."""
    index, epoch = (key, 0) if isinstance(key, (int, np.integer)) else key
    return int(index), int(epoch)


def sample_rng(seed: int, index: int, epoch: int) -> np.random.Generator:
    """All randomness of one training sample (segments, crop, flip): a function of (seed, epoch, video) only,
    so a sample does not depend on the worker or rank that loads it, and a resumed run sees the same data."""
    return np.random.default_rng([seed, epoch, index])


class SegmentSamples(Dataset):
    """Base of the training datasets keyed by ``(index, epoch)``: ``videos``, ``seed`` and ``num_segments``
    attributes; :meth:`draw` gives a sample's generator and its N TSN segment frames."""

    videos: VideoList
    seed: int
    num_segments: int

    def __len__(self) -> int:
        return len(self.videos)

    def rng(self, index: int, epoch: int) -> np.random.Generator:
        """The generator of sample ``index`` in ``epoch``."""
        return sample_rng(self.seed, index, epoch)

    def draw(self, key) -> tuple[int, np.random.Generator, str, np.ndarray]:
        """(index, generator, video id, the N segment frames) of sample ``key``; the crop is drawn next."""
        index, epoch = sample_key(key)
        rng = self.rng(index, epoch)
        return index, rng, self.videos.video_ids[index], train_indices(self.videos.num_frames[index],
                                                                        self.num_segments, rng)


class TrainClips(SegmentSamples):
    """Training samples: N TSN segments, one random frame or flow stack each, one crop + flip for all.

    Args:
        store: the frame store (``stream="rgb"``) or the flow store (``stream="flow"``).
        videos: the training videos.
        stream: ``"rgb"`` or ``"flow"``.
        num_segments: N (1: two-stream sampling, one random frame per video).
        input_size: S, the crop is resized to S x S ([STFN] §4.2: 224).
        flow_length: L, flow fields per stack ([STFN] §4.2: 10).
        seed: base seed of the per-sample generators.
        scales, base_size: crop sizes of :func:`pipeline.data.transforms.sample_crop_params`.
        flow_bound, flow_step: when given, every flow container's attributes must match.

    ``dataset[(index, epoch)]`` returns ``{"input": (N, C, S, S) uint8, "label": int, "index": int}``.
    """

    def __init__(self, store: VideoStore, videos: VideoList, stream: str, *, num_segments: int = 1,
                 input_size: int = 224, flow_length: int = 10, seed: int = 0,
                 scales: Sequence[int] = CROP_SCALES, base_size: int = 256, flow_bound: float | None = None,
                 flow_step: int | None = None) -> None:
        input_channels(stream, flow_length)
        if num_segments < 1:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}")
        self.store, self.videos, self.stream = store, videos, stream
        self.num_segments, self.input_size, self.flow_length = num_segments, input_size, flow_length
        self.seed, self.scales, self.base_size = seed, tuple(scales), base_size
        self.flow_bound, self.flow_step = flow_bound, flow_step

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, rng, vid, frames = self.draw(key)
        x = read_stream(self.store, self.stream, vid, frames, self.flow_length, self.flow_bound, self.flow_step)
        crop = sample_crop_params(x.shape[-2], x.shape[-1], rng, scales=self.scales, base_size=self.base_size)
        x = apply_crop(x, crop, self.input_size, is_flow=self.stream == "flow").contiguous()
        return {"input": x, "label": int(self.videos.labels[index]), "index": int(index)}


class EvalViews(Dataset):
    """Test (and validation) views: ``num_frames`` uniformly spaced frames or stacks, centre view each.

    ``dataset[i]`` returns ``{"input": (T, C, S, S) uint8, "label": int, "index": int}`` with
    T = ``num_frames`` (25 in the two-stream test protocol, Simonyan & Zisserman 2014 and TSN).
    """

    def __init__(self, store: VideoStore, videos: VideoList, stream: str, *, num_frames: int = 25,
                 input_size: int = 224, flow_length: int = 10, flow_bound: float | None = None,
                 flow_step: int | None = None) -> None:
        input_channels(stream, flow_length)
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.store, self.videos, self.stream = store, videos, stream
        self.num_frames, self.input_size, self.flow_length = num_frames, input_size, flow_length
        self.flow_bound, self.flow_step = flow_bound, flow_step

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict:
        vid = self.videos.video_ids[index]
        frames = eval_indices(self.videos.num_frames[index], self.num_frames)
        x = read_stream(self.store, self.stream, vid, frames, self.flow_length, self.flow_bound, self.flow_step)
        return {"input": center_view(x, self.input_size).contiguous(), "label": int(self.videos.labels[index]),
                "index": int(index)}
