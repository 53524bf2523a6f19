"""FstCN's inputs from the frame store: a clip V_clip and its frame differences V_diff ([FstCN] §2.2, eq. 4).

    V_diff(:, :, i_t) = |V(:, :, i_t) - V(:, :, i_t + d_t)|                          (eq. 4)

V_diff is sampled "with a same sampling index set" as V_clip, so V_diff frame k pairs frame ``frames[k]`` with
frame ``partners[k] = frames[k] + d_t`` of :class:`pipeline.data.sampling.FstcnClip`. It is computed on the fly
from the decoded frames (``decode``'s store; no store of its own), at the stored resolution, before any crop:
both then get the same crop and flip ([FstCN] §2.5), so a resized crop of V_diff is the crop of eq. 4's V_diff.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.data.sampling import FstcnClip
from pipeline.data.transforms import CropParams, apply_crop
from pipeline.io.store import VideoStore

__all__ = ["frame_difference", "read_fstcn_clip"]


def frame_difference(a: Tensor, b: Tensor) -> Tensor:
    """|a - b| of uint8 frames, exactly (computed in int16): eq. 4. Shapes must match; uint8 out."""
    if a.dtype != torch.uint8 or b.dtype != torch.uint8 or a.shape != b.shape:
        raise ValueError(f"frame_difference takes two uint8 tensors of one shape, got {tuple(a.shape)} {a.dtype} "
                         f"and {tuple(b.shape)} {b.dtype}")
    return (a.to(torch.int16) - b.to(torch.int16)).abs().to(torch.uint8)


def read_fstcn_clip(store: VideoStore, video_id: str, clip: FstcnClip, *, crop: CropParams | None = None,
                    input_size: int | None = None) -> tuple[Tensor, Tensor]:
    """V_clip and V_diff of one clip of a stored video, each frame read once.

    Args:
        store: the frame store ``decode`` writes (images ``"frames"``, (T, H, W, 3) RGB).
        video_id: the video.
        clip: which frames (:func:`pipeline.data.sampling.fstcn_train_clip` / ``fstcn_test_clips``).
        crop: one crop and flip for every frame of both (e.g.
            :func:`pipeline.data.transforms.sample_random_crop`); None: the full frames.
        input_size: the side a crop is resized to (default: the crop's own height).

    Returns:
        ``(clip, diff)``, each ``(l_t, 3, S, S)`` uint8 contiguous (``S = H, W`` without a crop).
    """
    wanted = sorted(set(clip.frames) | set(clip.partners))
    with store.reader(video_id) as r:
        images = r.read_images("frames", wanted)  # (k, H, W, 3)
    pos = {f: i for i, f in enumerate(wanted)}
    frames = images.permute(0, 3, 1, 2)
    v = frames[[pos[f] for f in clip.frames]]
    diff = frame_difference(v, frames[[pos[f] for f in clip.partners]])
    if crop is not None:
        size = crop.h if input_size is None else input_size
        v, diff = apply_crop(v, crop, size), apply_crop(diff, crop, size)
    return v.contiguous(), diff.contiguous()
