"""extract-flow's pair batcher: the frame pairs of many videos in batches of one TV-L1 call each.

A GPU computes TV-L1 fast only on large batches, and most videos have fewer pairs than a batch holds, so the
pairs of consecutive videos share a batch (videos of one frame size only: a video of another size starts a
new batch). The stage feeds videos (:class:`PairVideo`, read ahead of the computation by :func:`read_ahead`)
and gets each video's flow codes back once its last pair is computed (:func:`flows_by_video`)::

    videos = (PairVideo(vid, gray, step) for vid, gray in read_ahead(ids, load) if ...)
    for done in flows_by_video(videos, batch_size, compute):
        ...  # VideoFlows: commit it; VideoFailed: journal it

:func:`pair_batches` is the grouping alone: batches of at most ``batch_size`` pairs, every pair of every video
once and in order, the last partial batch flushed.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["PairVideo", "Piece", "VideoFailed", "VideoFlows", "flows_by_video", "pair_batches", "pair_frames",
           "read_ahead"]


@dataclass
class PairVideo:
    """A video to compute flow for: ``frames`` (T, H, W) (gray); pair ``i`` is frames (i, i + step), i < T - step."""

    video_id: str
    frames: Tensor
    step: int = 1

    @property
    def num_pairs(self) -> int:
        return int(self.frames.shape[0]) - self.step


class Piece(NamedTuple):
    """Pairs ``[start, stop)`` of one video, part of a batch."""

    video: PairVideo
    start: int
    stop: int


@dataclass
class VideoFlows:
    """Every pair of a video computed: ``codes`` (num_pairs, ...) in pair order, the concatenated results."""

    video_id: str
    codes: np.ndarray
    seconds: float


@dataclass
class VideoFailed:
    """A video whose batch failed; its other pairs are not computed."""

    video_id: str
    reason: str


def pair_batches(videos: Iterable[PairVideo], batch_size: int) -> Iterator[list[Piece]]:
    """The pairs of ``videos``, in order, as batches of at most ``batch_size`` pairs.

    A batch is full (``batch_size`` pairs) unless it is the last one or the next video has another frame size
    (then it is flushed first: a batch is one tensor). A video with more pairs than fit spans batches.
    ``videos`` is read lazily, one video ahead of the batch being filled.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[Piece] = []
    room, size = batch_size, None
    for video in videos:
        if video.num_pairs < 1:
            raise ValueError(f"{video.video_id}: {video.frames.shape[0]} frames give no pair with step {video.step}")
        if batch and tuple(video.frames.shape[1:]) != size:
            yield batch
            batch, room = [], batch_size
        size = tuple(video.frames.shape[1:])
        start = 0
        while start < video.num_pairs:
            take = min(room, video.num_pairs - start)
            batch.append(Piece(video, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                yield batch
                batch, room = [], batch_size
    if batch:
        yield batch


def pair_frames(batch: list[Piece]) -> tuple[Tensor, Tensor]:
    """The first and second frames of a batch's pairs: two (B, H, W) tensors."""
    first = torch.cat([p.video.frames[p.start:p.stop] for p in batch])
    second = torch.cat([p.video.frames[p.start + p.video.step:p.stop + p.video.step] for p in batch])
    return first, second


def flows_by_video(videos: Iterable[PairVideo], batch_size: int, compute: Callable[[list[Piece]], Any],
                   on_batch: Callable[[int], None] | None = None) -> Iterator[VideoFlows | VideoFailed]:
    """Run ``compute`` on :func:`pair_batches` of ``videos``; yield each video once its last pair is computed.

    ``compute(batch)`` returns one result per pair of the batch, in order (an array of ``len`` = pairs).
    ``on_batch(pairs)`` is called after each computed batch (progress). A batch whose ``compute`` raises fails
    its videos (:class:`VideoFailed`, once per video) and their later pairs are skipped; the other videos go on.
    """
    parts: dict[str, list] = {}
    started: dict[str, float] = {}
    failed: set[str] = set()
    for batch in pair_batches(videos, batch_size):
        batch = [p for p in batch if p.video.video_id not in failed]
        if not batch:
            continue
        for p in batch:
            started.setdefault(p.video.video_id, time.perf_counter())
        try:
            codes = compute(batch)
        except Exception as e:  # noqa: BLE001 - a failing batch fails its videos, not the run
            for vid in dict.fromkeys(p.video.video_id for p in batch):
                failed.add(vid)
                parts.pop(vid, None)
                yield VideoFailed(vid, f"{type(e).__name__}: {e}")
            continue
        if len(codes) != sum(p.stop - p.start for p in batch):
            raise ValueError(f"compute returned {len(codes)} results for {sum(p.stop - p.start for p in batch)} pairs")
        if on_batch is not None:
            on_batch(len(codes))
        k = 0
        for p in batch:
            vid = p.video.video_id
            parts.setdefault(vid, []).append(codes[k:k + p.stop - p.start])
            k += p.stop - p.start
            if p.stop == p.video.num_pairs:
                yield VideoFlows(vid, np.concatenate(parts.pop(vid)), time.perf_counter() - started.pop(vid))


def read_ahead(keys: Iterable[Hashable], load: Callable[[Any], Any], depth: int = 2
               ) -> Iterator[tuple[Any, Any]]:
    """``(key, load(key))`` in order, the next ``depth`` keys loading in background threads meanwhile (frames
    are read while TV-L1 runs). A load that raises gives ``(key, the exception)`` instead."""
    keys = iter(keys)
    with ThreadPoolExecutor(depth) as pool:
        pending = [(k, pool.submit(load, k)) for k in islice(keys, depth)]
        while pending:
            key, future = pending.pop(0)
            pending += [(k, pool.submit(load, k)) for k in islice(keys, 1)]
            try:
                value = future.result()
            except Exception as e:  # noqa: BLE001 - the caller records it for that key
                value = e
            yield key, value
