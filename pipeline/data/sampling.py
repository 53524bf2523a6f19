"""Which frames and flow fields a sample uses: TSN segments, test views, flow stacks, feature positions.

All indices are 0-based frame indices into a decoded video of ``num_frames`` frames. Its flow
has ``num_flows = num_frames - 1`` fields (step 1); flow ``i`` goes from frame ``i`` to frame
``i + 1``.

[STFN] §4.2: a video is divided into N segments of equal length; in training one random frame
is taken from each segment and the flow stack centred on it goes with it; in testing frames are
sampled uniformly. The rules below follow TSN's reference data loader
(yjxiong/tsn-pytorch, ``dataset.py``: ``TSNDataSet._sample_indices`` and ``_get_test_indices``),
shifted from its 1-based image names to 0-based indices.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "FlowStack",
    "feature_positions",
    "flow_stack",
    "flow_stack_indices",
    "test_indices",
    "train_indices",
]


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


def test_indices(num_frames: int, num_samples: int = 25) -> list[int]:
    """``num_samples`` uniformly spaced frames: the centre frame of each of that many equal parts.

    TSN's ``_get_test_indices``: ``tick = num_frames / num_samples`` and sample ``k`` is
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
    :func:`test_indices`, so P = 25 reproduces the two-stream test frames). Dense positions let
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


# The name starts with "test_"; keep pytest from collecting it where a test module imports it.
test_indices.__test__ = False  # type: ignore[attr-defined]
