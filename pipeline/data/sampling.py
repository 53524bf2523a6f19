"""Which frames and flow fields a sample uses: TSN segments, test views, flow stacks, feature positions, and
which of a video's P cached feature positions a head's segments and test sequences take.

All indices are 0-based frame indices into a decoded video of ``num_frames`` frames. Its flow
has ``num_flows = num_frames - 1`` fields (step 1); flow ``i`` goes from frame ``i`` to frame
``i + 1``.

[STFN] §4.2: a video is divided into N segments of equal length; in training one random frame
is taken from each segment and the flow stack centred on it goes with it; in testing frames are
sampled uniformly. The rules below follow TSN's reference data loader
(yjxiong/tsn-pytorch, ``dataset.py``: ``TSNDataSet._sample_indices`` and ``_get_eval_indices``),
shifted from its 1-based image names to 0-based indices.

A head ([STFN] §4.2) reads features at P cached positions per video (:func:`feature_positions`). Segment s of
N covers positions [floor(s P / N), floor((s + 1) P / N)) (:func:`segment_positions`); training takes one
random position per segment (:func:`train_positions`), testing ``num_test`` = 5 (:data:`NUM_TEST`) sequences,
sequence j taking in every segment the position start + floor((j + 1/2) L / num_test) (L the segment's length:
uniformly spaced, centred; :func:`eval_sequences`). ``refine`` samples its frames by the same rules
(:mod:`pipeline.data.paired`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "NUM_TEST",
    "FlowStack",
    "eval_indices",
    "eval_sequences",
    "feature_positions",
    "flow_stack",
    "flow_stack_indices",
    "segment_positions",
    "train_indices",
    "train_positions",
]

#: [STFN] §4.2: a head is tested on 5 sequences of N positions per video.
NUM_TEST = 5


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def train_indices(num_frames: int, num_segments: int, rng: np.random.Generator) -> list[int]:
    """One random frame from each of ``num_segments`` equal segments (TSN training sampling).

    With ``d = num_frames // num_segments`` (TSN's ``average_duration``), segment ``k`` is the
    frames ``[k*d, (k+1)*d)`` and frame ``k*d + U{0..d-1}`` is drawn for it; the last
    ``num_frames % num_segments`` frames are never drawn, as in TSN. A video shorter than
    ``num_segments`` frames (``d == 0``) gives frame 0 for every segment, TSN's fallback
    (``offsets = np.zeros((num_segments,))``).

    Args:
        num_frames: frames in the video (>= 1).
        num_segments: ``N`` ([STFN] uses 5).
        rng: source of randomness; the draws are ``rng.integers(d, size=num_segments)``.

    Returns:
        ``num_segments`` non-decreasing frame indices.
    """
    _check_positive("num_frames", num_frames)
    _check_positive("num_segments", num_segments)
    duration = num_frames // num_segments
    if duration == 0:
        return [0] * num_segments
    offsets = rng.integers(duration, size=num_segments)
    return [int(k * duration + o) for k, o in enumerate(offsets)]


def eval_indices(num_frames: int, num_samples: int = 25) -> list[int]:
    """``num_samples`` uniformly spaced frames: the centre frame of each of that many equal parts.

    TSN's ``_get_eval_indices``: ``tick = num_frames / num_samples`` and sample ``k`` is
    ``int(tick / 2 + tick * k)``, computed here exactly in integers as
    ``(num_frames * (2k + 1)) // (2 * num_samples)``. (TSN's floats land one frame lower where
    that value is an exact integer: 6 frames, 7 samples, k = 3 gives 3 here and 2 in TSN.)
    25 frames per video is the two-stream test protocol (Simonyan & Zisserman 2014; TSN).
    100 frames give 2, 6, 10, ..., 98. With fewer frames than samples, frames repeat.

    Returns:
        ``num_samples`` non-decreasing frame indices in ``[0, num_frames)``.
    """
    _check_positive("num_frames", num_frames)
    _check_positive("num_samples", num_samples)
    return [(num_frames * (2 * k + 1)) // (2 * num_samples) for k in range(num_samples)]


def feature_positions(num_frames: int, num_positions: int) -> np.ndarray:
    """Frames at which features are extracted densely: the centre of each of P equal parts.

    Position ``k`` is the frame index ``floor(num_frames * (k + 0.5) / P)``, the frame that
    contains the centre of the k-th of P equal parts of the video (the same rule as
    :func:`eval_indices`, so P = 25 reproduces the two-stream test frames). Dense positions let
    the number of segments of a head (3, 5, 7, 9) be chosen when training the head: segment
    ``s`` of N uses the positions whose part lies in it.

    Returns:
        float64 array of shape ``(P,)`` holding integral, non-decreasing frame indices in
        ``[0, num_frames)`` (float so it can sit beside features and be divided by
        ``num_frames`` for relative time).
    """
    _check_positive("num_frames", num_frames)
    _check_positive("num_positions", num_positions)
    k = np.arange(num_positions, dtype=np.int64)
    return ((num_frames * (2 * k + 1)) // (2 * num_positions)).astype(np.float64)


class FlowStack(NamedTuple):
    """The flow fields of one stack: ``indices[j]`` is flow ``start + j`` unless clamped."""

    center: int
    start: int
    indices: list[int]


def flow_stack(center: int, num_flows: int, L: int = 10) -> FlowStack:
    """The ``L`` consecutive flow fields centred on frame ``center`` ([STFN] §4.2, L = 10).

    The window is flows ``center - L//2 .. center - L//2 + L - 1``; for L = 10 that is
    ``c-5 .. c+4``, the motion from frame ``c-5`` to frame ``c+5``, symmetric around frame
    ``c`` (for odd L it spans one more frame after ``c`` than before). Near the ends the window
    is shifted, not truncated, into ``[0, num_flows - L]``, so it always holds L distinct,
    consecutive flows. A video with fewer than L flows gets all of them followed by repeats of
    the last one (TSN's loader likewise stops advancing at the last image).

    Args:
        center: the sampled frame, in ``[0, num_flows]`` (there are ``num_flows + 1`` frames).
        num_flows: flow fields in the video (``num_frames - 1``, >= 1).
        L: flow fields per stack; the network input has 2L channels.
    """
    _check_positive("num_flows", num_flows)
    _check_positive("L", L)
    if not 0 <= center <= num_flows:
        raise ValueError(f"center frame {center} is outside [0, {num_flows}] for a video with {num_flows} flows")
    start = min(max(center - L // 2, 0), max(num_flows - L, 0))
    indices = [min(start + j, num_flows - 1) for j in range(L)]
    return FlowStack(center=int(center), start=int(start), indices=indices)


def flow_stack_indices(center: int, num_flows: int, L: int = 10) -> list[int]:
    """The flow indices of :func:`flow_stack` (``L`` of them)."""
    return flow_stack(center, num_flows, L).indices


# --------------------------------------------------------------------------------------------
# [STPN] multi-path flow sampling: K flow stacks at t + j * tau around the RGB frame t
# --------------------------------------------------------------------------------------------

#: [STPN] §3.2 / §4.1: tau is drawn uniformly from 1..10 frames, in training and in testing.
STPN_MAX_TAU = 10
#: [STPN] §4.7: 10 snippets per test video (each with crops and flips, :func:`pipeline.data.transforms.ten_crop`).
STPN_TEST_SNIPPETS = 10
#: Flow-map offsets (frames from the position) the cached-map variant keeps per position: one tau = 5, about the
#: mean (5.5) of the paper's U{1..10}; three flow maps per position. A set such as (-10, -5, 0, 5, 10) allows
#: a draw between tau = 5 and tau = 10 for three paths at five maps per position. (Choice of this pipeline:
#: the paper draws tau afresh per sample from ten values, which a cache cannot hold at any affordable size.)
STPN_CACHED_OFFSETS = (-5, 0, 5)


class PathSample(NamedTuple):
    """One [STPN] sample: the RGB frame, the interval tau and the K flow-stack centres (frames)."""

    frame: int
    tau: int
    centres: list[int]


class CachedPathSample(NamedTuple):
    """One [STPN] sample on cached maps: a position, tau, and the K paths as indices into the cached offsets."""

    position: int
    tau: int
    paths: list[int]


def path_multipliers(num_paths: int) -> list[int]:
    """The multiples of tau of the K paths: ``j = r - (K-1)//2`` for ``r = 0..K-1``.

    K = 1: [0]; K = 3: [-1, 0, 1] (t - tau, t, t + tau, [STPN] §3.2); K = 5: [-2, -1, 0, 1, 2]; an even K has one
    more path after t than before (K = 2: [0, 1]), the rule of ``stcb_temporal``'s neighbouring segments.
    """
    _check_positive("num_paths", num_paths)
    centre = (num_paths - 1) // 2
    return [r - centre for r in range(num_paths)]


def offset_centres(center: int, offsets: list[int] | tuple[int, ...], num_frames: int) -> list[int]:
    """Frames ``center + o`` for each offset, clamped to the video ``[0, num_frames - 1]``.

    The clamp is this pipeline's choice ([STPN] does not say what happens near the ends): a path that would
    leave the video takes the first / last frame, so paths may coincide in short videos. Each centre then
    gives its flow stack by :func:`flow_stack` (``num_flows = num_frames - 1``), which shifts the window into
    the video.
    """
    _check_positive("num_frames", num_frames)
    if not 0 <= center < num_frames:
        raise ValueError(f"frame {center} is outside [0, {num_frames - 1}] for a video of {num_frames} frames")
    return [min(max(int(center) + int(o), 0), num_frames - 1) for o in offsets]


def path_centres(center: int, tau: int, num_frames: int, num_paths: int = 3) -> list[int]:
    """The K flow-stack centres ``t + j * tau`` (``j`` from :func:`path_multipliers`), clamped to the video."""
    _check_positive("tau", tau)
    return offset_centres(center, [j * int(tau) for j in path_multipliers(num_paths)], num_frames)


def stpn_train_sample(num_frames: int, rng: np.random.Generator, *, num_paths: int = 3,
                      max_tau: int = STPN_MAX_TAU) -> PathSample:
    """A training sample of [STPN]: a random frame t, tau ~ U{1..max_tau}, flow stacks at t + j * tau.

    The draws, in order: ``t = rng.integers(num_frames)`` (a uniformly random frame of the video, the
    two-stream training sample [Two-Stream]; [STPN] §4.1 does not state another rule), then
    ``tau = rng.integers(1, max_tau + 1)`` ([STPN] §3.2, §4.1). The RGB input is frame t; path centres by
    :func:`path_centres`.
    """
    _check_positive("num_frames", num_frames)
    _check_positive("max_tau", max_tau)
    t = int(rng.integers(num_frames))
    tau = int(rng.integers(1, max_tau + 1))
    return PathSample(t, tau, path_centres(t, tau, num_frames, num_paths))


def stpn_test_snippets(num_frames: int, rng: np.random.Generator, *, num_snippets: int = STPN_TEST_SNIPPETS,
                       num_paths: int = 3, max_tau: int = STPN_MAX_TAU) -> list[PathSample]:
    """The test snippets of one video ([STPN] §4.7): ``num_snippets`` frames, each with its own tau.

    [STPN] samples the 10 snippets "randomly"; here they are the uniformly spaced frames of
    :func:`eval_indices` (the two-stream test frames [Two-Stream] that §4.7 follows, and reproducible), and tau
    is drawn per snippet, ``rng.integers(1, max_tau + 1, size=num_snippets)``, since §3.2 draws it in testing
    too. Each snippet is then seen in the 10 crops and flips of :func:`pipeline.data.transforms.ten_crop` and
    the class probabilities of all snippets and views are averaged.
    """
    _check_positive("max_tau", max_tau)
    frames = eval_indices(num_frames, num_snippets)
    taus = rng.integers(1, max_tau + 1, size=num_snippets)
    return [PathSample(t, int(tau), path_centres(t, int(tau), num_frames, num_paths)) for t, tau in zip(frames, taus)]


def cached_taus(offsets: list[int] | tuple[int, ...], num_paths: int = 3) -> list[int]:
    """The tau >= 1 for which every path offset ``j * tau`` is among the cached ``offsets`` (increasing).

    For one path only offset 0 is needed and the answer is ``[0]`` (tau plays no part). Raises ValueError when
    0 is not cached or no tau fits K paths.
    """
    cached = {int(o) for o in offsets}
    if len(cached) != len(offsets):
        raise ValueError(f"cached flow offsets must be distinct, got {list(offsets)}")
    if 0 not in cached:
        raise ValueError(f"cached flow offsets {list(offsets)} lack 0 (the stack at the position itself)")
    multipliers = path_multipliers(num_paths)
    if num_paths == 1:
        return [0]
    taus = [tau for tau in sorted(o for o in cached if o > 0) if all(j * tau in cached for j in multipliers)]
    if not taus:
        raise ValueError(f"cached flow offsets {sorted(cached)} hold no tau with all of {num_paths} paths "
                         f"(offsets j * tau for j in {multipliers})")
    return taus


def _cached_paths(offsets: list[int] | tuple[int, ...], tau: int, num_paths: int) -> list[int]:
    index = {int(o): i for i, o in enumerate(offsets)}
    return [index[j * tau] for j in path_multipliers(num_paths)]


def stpn_cached_train_sample(num_positions: int, offsets: list[int] | tuple[int, ...], rng: np.random.Generator, *,
                             num_paths: int = 3) -> CachedPathSample:
    """A training sample on cached maps: a random cached position, a tau drawn among :func:`cached_taus`.

    The draws, in order: ``position = rng.integers(num_positions)``, then
    ``tau = taus[rng.integers(len(taus))]``. ``paths`` indexes ``offsets``: the flow maps of that position to
    fuse. Differences from :func:`stpn_train_sample` (the paper): t is one of P positions, not any frame, and tau
    takes the few cached values, not U{1..10} (with the default offsets only tau = 5).
    """
    _check_positive("num_positions", num_positions)
    taus = cached_taus(offsets, num_paths)
    position = int(rng.integers(num_positions))
    tau = int(taus[int(rng.integers(len(taus)))])
    return CachedPathSample(position, tau, _cached_paths(offsets, tau, num_paths))


def stpn_cached_test_snippets(num_positions: int, offsets: list[int] | tuple[int, ...], rng: np.random.Generator,
                              *, num_snippets: int = STPN_TEST_SNIPPETS,
                              num_paths: int = 3) -> list[CachedPathSample]:
    """The test snippets on cached maps: positions ``eval_indices(num_positions, num_snippets)`` (P = 25 gives
    1, 3, 6, 8, 11, 13, 16, 18, 21, 23), each with a tau drawn among :func:`cached_taus`
    (``rng.integers(len(taus), size=num_snippets)``); the cached views stand for the crops and flips."""
    taus = cached_taus(offsets, num_paths)
    positions = eval_indices(num_positions, num_snippets)
    picks = rng.integers(len(taus), size=num_snippets)
    return [CachedPathSample(p, int(taus[k]), _cached_paths(offsets, int(taus[k]), num_paths))
            for p, k in zip(positions, picks)]


__all__ += [
    "CachedPathSample",
    "PathSample",
    "STPN_CACHED_OFFSETS",
    "STPN_MAX_TAU",
    "STPN_TEST_SNIPPETS",
    "cached_taus",
    "offset_centres",
    "path_centres",
    "path_multipliers",
    "stpn_cached_test_snippets",
    "stpn_cached_train_sample",
    "stpn_test_snippets",
    "stpn_train_sample",
]


# --------------------------------------------------------------------------------------------
# FstCN clips ([FstCN] §2.2, §3): l_t frames at stride s_t, each paired with frame + d_t for V_diff
# --------------------------------------------------------------------------------------------

__all__ += ["FSTCN_D_T", "FSTCN_L_T", "FSTCN_NUM_CLIPS", "FSTCN_S_T", "FstcnClip", "fstcn_clip", "fstcn_scl_frame",
            "fstcn_span", "fstcn_test_clips", "fstcn_train_clip"]

#: [FstCN] §3: "d_t = 9 and s_t = 5"; l_t = 5 ("5 temporally sampled pairs"); M = 5 test clips (not stated).
FSTCN_L_T, FSTCN_S_T, FSTCN_D_T, FSTCN_NUM_CLIPS = 5, 5, 9, 5


class FstcnClip(NamedTuple):
    """One FstCN clip: V_clip is frames ``frames``; V_diff frame k is |frame ``frames[k]`` - frame ``partners[k]``|
    (eq. 4: ``partners[k] = frames[k] + d_t``, clamped to the last frame in a short video)."""

    start: int
    frames: list[int]
    partners: list[int]


def fstcn_span(l_t: int = FSTCN_L_T, s_t: int = FSTCN_S_T, d_t: int = FSTCN_D_T) -> int:
    """Frames a clip covers: ``(l_t - 1) * s_t + d_t + 1`` (30 for 5, 5, 9)."""
    for name, value in (("l_t", l_t), ("s_t", s_t), ("d_t", d_t)):
        _check_positive(name, value)
    return (l_t - 1) * s_t + d_t + 1


def fstcn_clip(start: int, num_frames: int, l_t: int = FSTCN_L_T, s_t: int = FSTCN_S_T,
               d_t: int = FSTCN_D_T) -> FstcnClip:
    """The clip starting at frame ``start``: ``frames[k] = start + k * s_t`` and ``partners[k] = frames[k] + d_t``
    ([FstCN] §2.2, eq. 4), every index clamped to ``num_frames - 1``.

    The clamp only acts in a video shorter than :func:`fstcn_span` (the starts drawn below always fit a
    long enough video). There (not covered by the paper) the clip keeps its stride and its l_t positions
    and repeats the last frame past the end, as :func:`flow_stack` and TSN's loader do: a V_diff frame whose
    partner is clamped spans fewer than d_t frames, and is all zero where both are the last frame.
    """
    _check_positive("num_frames", num_frames)
    fstcn_span(l_t, s_t, d_t)
    if not 0 <= start < num_frames:
        raise ValueError(f"clip start {start} is outside [0, {num_frames}) for a video of {num_frames} frames")
    last = num_frames - 1
    frames = [min(start + k * s_t, last) for k in range(l_t)]
    return FstcnClip(start=int(start), frames=frames, partners=[min(f + d_t, last) for f in frames])


def fstcn_train_clip(num_frames: int, rng: np.random.Generator, l_t: int = FSTCN_L_T, s_t: int = FSTCN_S_T,
                     d_t: int = FSTCN_D_T) -> FstcnClip:
    """A training clip ([FstCN] §2.2: "temporally specifying a starting frame"): the start uniform over every
    start whose clip fits the video, ``rng.integers(num_frames - span + 1)``; 0 in a shorter video
    (:func:`fstcn_clip` then clamps, without drawing from ``rng``)."""
    max_start = num_frames - fstcn_span(l_t, s_t, d_t)
    start = int(rng.integers(max_start + 1)) if max_start > 0 else 0
    return fstcn_clip(start, num_frames, l_t, s_t, d_t)


def fstcn_test_clips(num_frames: int, num_clips: int = FSTCN_NUM_CLIPS, l_t: int = FSTCN_L_T,
                     s_t: int = FSTCN_S_T, d_t: int = FSTCN_D_T) -> list[FstcnClip]:
    """The M test clips of a video ([FstCN] §2.4; M is not stated): starts spread evenly over the
    ``num_frames - span + 1`` starts that fit, by :func:`eval_indices` (the centre of each of M equal parts);
    all start at 0 in a video shorter than the span."""
    _check_positive("num_clips", num_clips)
    valid = max(num_frames - fstcn_span(l_t, s_t, d_t) + 1, 1)
    return [fstcn_clip(s, num_frames, l_t, s_t, d_t) for s in eval_indices(valid, num_clips)]


def fstcn_scl_frame(l_t: int = FSTCN_L_T, rng: np.random.Generator | None = None) -> int:
    """Which of a clip's l_t frames feeds the SCL path ([FstCN] §2.2): a random one in training
    (``rng.integers(l_t)``), the middle one at test (``rng`` None): ``(l_t - 1) // 2``, the lower middle for
    an even l_t."""
    _check_positive("l_t", l_t)
    return int(rng.integers(l_t)) if rng is not None else (l_t - 1) // 2


# ----------------------------------------------------------------------------------------------------------
# [ST-Mult]: the Spatiotemporal Multiplier network's clips
# ----------------------------------------------------------------------------------------------------------

def stmult_train_indices(num_frames: int, rng: np.random.Generator, *, num_samples: int = 5,
                         min_stride: int = 5, max_stride: int = 35) -> list[int]:
    """A training clip of [ST-Mult] §4.1: ``num_samples`` = 5 frames at a random temporal stride of 5..35.

    The stride is capped so that the clip fits the video: with ``cap = (num_frames - 1) // (num_samples - 1)``
    it is drawn as ``s = rng.integers(lo, hi + 1)`` with ``hi = min(max_stride, cap)`` and ``lo = min(min_stride,
    hi)`` (so a video of fewer than ``4 * 5 + 1`` frames uses its largest stride that fits), then the first
    frame as ``rng.integers(0, num_frames - (num_samples - 1) * s)``; the clip is ``start + k * s``. The
    paper's "random temporal stride between 5 and 35 frames" does not say how the stride meets short videos;
    the released loader (``cnn_get_im_flow_batch.m``, ``temporalStrideRandom``) falls back to evenly spaced
    frames. A video shorter than ``num_samples`` frames likewise gets :func:`eval_indices`' ``num_samples``
    evenly spaced frames (frames repeat; nothing is drawn).

    Returns:
        ``num_samples`` non-decreasing frame indices in ``[0, num_frames)``.
    """
    _check_positive("num_frames", num_frames)
    _check_positive("num_samples", num_samples)
    _check_positive("min_stride", min_stride)
    _check_positive("max_stride", max_stride)
    if min_stride > max_stride:
        raise ValueError(f"min_stride {min_stride} exceeds max_stride {max_stride}")
    if num_samples == 1:
        return [int(rng.integers(0, num_frames))]
    cap = (num_frames - 1) // (num_samples - 1)
    if cap == 0:
        return eval_indices(num_frames, num_samples)
    hi = min(max_stride, cap)
    stride = int(rng.integers(min(min_stride, hi), hi + 1))
    start = int(rng.integers(0, num_frames - (num_samples - 1) * stride))
    return [start + k * stride for k in range(num_samples)]


def stmult_test_chunks(num_frames: int, *, num_samples: int = 25, chunk_size: int = 25) -> list[list[int]]:
    """The test frames of [ST-Mult] §4.2: :func:`eval_indices`' ``num_samples`` = 25 uniformly spaced frames,
    cut into consecutive chunks of ``chunk_size`` frames, each one forward pass of the network (its temporal
    convs and max over time see one chunk). The default, one chunk of 25, is §4.2's "classifying the video in
    a single forward pass"; smaller chunks (e.g. 5, the training clip's length) bound memory and the span of
    the temporal max (docs/networks.md).

    Returns:
        ``num_samples // chunk_size`` lists of ``chunk_size`` non-decreasing frame indices.
    """
    _check_positive("num_samples", num_samples)
    _check_positive("chunk_size", chunk_size)
    if num_samples % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} does not divide num_samples {num_samples}")
    frames = eval_indices(num_frames, num_samples)
    return [frames[i:i + chunk_size] for i in range(0, num_samples, chunk_size)]


__all__ += ["stmult_test_chunks", "stmult_train_indices"]


# ----------------------------------------------------------------------------------------------------------
# A head's segments over the P cached feature positions
# ----------------------------------------------------------------------------------------------------------

def segment_positions(P: int, N: int) -> np.ndarray:
    """(N, 2) int64 array of [start, stop) position ranges of the N segments over P positions."""
    if N < 1:
        raise ValueError(f"number of segments must be >= 1, got {N}")
    if P < N:
        raise ValueError(f"{P} cached positions cannot be split into {N} segments (need P >= N)")
    s = np.arange(N + 1, dtype=np.int64)
    edges = (s * P) // N
    bounds = np.stack([edges[:-1], edges[1:]], axis=1)
    empty = np.flatnonzero(bounds[:, 1] <= bounds[:, 0])
    if empty.size:
        raise ValueError(f"segments {empty.tolist()} of {N} get no position out of P={P}")
    return bounds


def train_positions(P: int, N: int, generator, num_videos: int | None = None):
    """One uniformly random position per segment: (N,) or (num_videos, N) int64 torch tensor (CPU), drawn from
    the ``torch.Generator`` ``generator`` (one float64 uniform per segment and video)."""
    import torch

    bounds = torch.from_numpy(segment_positions(P, N))
    start, length = bounds[:, 0], bounds[:, 1] - bounds[:, 0]
    shape = (N,) if num_videos is None else (num_videos, N)
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    offset = torch.minimum((u * length).long(), length - 1)
    return start + offset


def eval_sequences(P: int, N: int, num: int = NUM_TEST) -> np.ndarray:
    """(num, N) int64: sequence j takes start + floor((2j+1) L / (2 num)) in each segment (the test and
    validation protocol of a head, [STFN] §4.2)."""
    if num < 1:
        raise ValueError(f"num test sequences must be >= 1, got {num}")
    bounds = segment_positions(P, N)
    start, length = bounds[:, 0], bounds[:, 1] - bounds[:, 0]
    j = np.arange(num, dtype=np.int64)[:, None]
    return start + ((2 * j + 1) * length) // (2 * num)
