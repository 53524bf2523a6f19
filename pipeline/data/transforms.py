"""Spatial augmentation and test views for frames and flow stacks, as functions on uint8 tensors.

[STFN] §4.2: "The width and height of the cropped image are randomly sampled from
{256, 224, 192, 168}, and the input images are cropped from the four corners and the center of
the original images. The cropped images are then resized to 224×224 ... and mirroring in
horizontal direction ... Same data augmentation techniques are employed for the optical flow
sub-volume", and "We apply same augmentations for selected frames and optical flow stacks in an
input sequence": :func:`sample_crop_params` draws one :class:`CropParams` per sample, and
:func:`apply_crop` applies it to every frame and every flow field of that sample.

Shapes are ``(..., C, H, W)``: any leading dims (frames ``T``, segments ``N``, views), then
channels. RGB has ``C = 3``. Flow has (x, y) pairs along the channel dim, ``x`` first: a stack
of L fields is ``(L, 2, H, W)`` or ``(2L, H, W)`` as ``x0, y0, x1, y1, ...``; in both layouts
the x components are the even channels.

Flow is uint8, quantized as ``q = round((f + bound) * 255 / (2 * bound))`` clipped to [0, 255]
(denseflow / TSN). That map is symmetric about 127.5, so the quantized value of ``-f`` is
``255 - q``: a horizontal flip turns the x component into ``255 - x`` and leaves y alone (TSN's
``GroupRandomHorizontalFlip(is_flow=True)`` inverts the x images the same way). It is exact
except where ``(f + bound) * 255 / (2 * bound)`` lies exactly halfway between integers, e.g.
zero flow: 127.5 rounds to 128 and its flip gives 127, an error of half a quantization step
(``bound / 255`` px). Flow values are not rescaled when a crop is resized (as in TSN), so they
stay in pixels of the stored resolution.

Resizing uses ``torchvision.transforms.v2.functional.resize`` (bilinear, ``antialias=True``),
which keeps uint8.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

__all__ = [
    "CROP_POSITIONS",
    "CROP_SCALES",
    "CropParams",
    "MultiScaleCornerCrop",
    "apply_crop",
    "center_crop",
    "center_view",
    "crop_sizes",
    "flip_horizontal",
    "resize_short_side",
    "sample_crop_params",
    "ten_crop",
]

# [STFN] §4.2: crop widths and heights, in pixels of frames whose short side is 256.
CROP_SCALES = (256, 224, 192, 168)
# [STFN] §4.2: "cropped from the four corners and the center".
CROP_POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")


class CropParams(NamedTuple):
    """One sample's augmentation: the crop box ``[top, top + h) x [left, left + w)``, then a flip."""

    top: int
    left: int
    h: int
    w: int
    flip: bool


def _check_uint8(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() < 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        dtype = x.dtype if isinstance(x, Tensor) else None
        raise ValueError(f"{name} must be a uint8 tensor of shape (..., C, H, W), got {shape} {dtype}")


def crop_sizes(short_side: int, scales: Sequence[int] = CROP_SCALES, base_size: int = 256) -> list[int]:
    """The crop side lengths for frames with this short side.

    The scales are stated for frames resized to a short side of ``base_size`` = 256 ([STFN]
    §4.2). Frames with another short side (e.g. the small demo frames) use
    ``round(scale * short_side / base_size)``, at least 1 and at most ``short_side``, so the
    crops cover the same fractions of the frame.
    """
    if short_side < 1:
        raise ValueError(f"short_side must be >= 1, got {short_side}")
    if not scales or any(s < 1 for s in scales):
        raise ValueError(f"scales must be positive pixel sizes, got {tuple(scales)}")
    return [min(max(round(s * short_side / base_size), 1), short_side) for s in scales]


def _corner_offset(position: str, height: int, width: int, h: int, w: int) -> tuple[int, int]:
    """(top, left) of an ``h x w`` crop at one of :data:`CROP_POSITIONS`; centre rounds down."""
    if position == "top_left":
        return 0, 0
    if position == "top_right":
        return 0, width - w
    if position == "bottom_left":
        return height - h, 0
    if position == "bottom_right":
        return height - h, width - w
    if position == "center":
        return (height - h) // 2, (width - w) // 2
    raise ValueError(f"unknown crop position {position!r}; valid: {', '.join(CROP_POSITIONS)}")


def sample_crop_params(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    scales: Sequence[int] = CROP_SCALES,
    base_size: int = 256,
) -> CropParams:
    """Draw a multi-scale corner crop and a flip for ``height x width`` frames ([STFN] §4.2).

    Width and height are drawn independently from :func:`crop_sizes` (so the aspect ratio varies
    too), the position uniformly from the 4 corners and the centre, and ``flip`` with
    probability 0.5. Draw order from ``rng``: width, height, position, flip.
    """
    sizes = crop_sizes(min(height, width), scales, base_size)
    w = sizes[int(rng.integers(len(sizes)))]
    h = sizes[int(rng.integers(len(sizes)))]
    position = CROP_POSITIONS[int(rng.integers(len(CROP_POSITIONS)))]
    flip = bool(rng.random() < 0.5)
    top, left = _corner_offset(position, height, width, h, w)
    return CropParams(top=top, left=left, h=h, w=w, flip=flip)


def flip_horizontal(x: Tensor, *, is_flow: bool = False) -> Tensor:
    """Mirror ``(..., C, H, W)`` uint8 left-right; for flow also ``x -> 255 - x`` on even channels.

    See the module docstring for why ``255 - x`` negates quantized horizontal flow.
    """
    _check_uint8(x)
    out = x.flip(-1)
    if is_flow:
        if x.shape[-3] % 2:
            raise ValueError(f"flow must have (x, y) channel pairs, got {x.shape[-3]} channels")
        out[..., 0::2, :, :] = 255 - out[..., 0::2, :, :]
    return out


def _resize(x: Tensor, size: list[int]) -> Tensor:
    return TF.resize(x, size, antialias=True)


def apply_crop(x: Tensor, params: CropParams, input_size: int = 224, *, is_flow: bool = False) -> Tensor:
    """Crop, resize to ``input_size x input_size`` and optionally flip, the same for every frame.

    Args:
        x: ``(..., C, H, W)`` uint8, e.g. ``(T, 3, H, W)`` frames or ``(T, 2, H, W)`` flow.
        params: from :func:`sample_crop_params` for this ``H x W``.
        input_size: network input side (224 in [STFN] §4.2).
        is_flow: flip the x channels' sign as well (``255 - x``).

    Returns:
        ``(..., C, input_size, input_size)`` uint8.
    """
    _check_uint8(x)
    height, width = x.shape[-2:]
    top, left, h, w, flip = params
    if h < 1 or w < 1 or top < 0 or left < 0 or top + h > height or left + w > width:
        raise ValueError(f"crop {params} does not fit frames of {height}x{width}")
    out = _resize(x[..., top : top + h, left : left + w], [input_size, input_size])
    return flip_horizontal(out, is_flow=is_flow) if flip else out


def resize_short_side(x: Tensor, size: int) -> Tensor:
    """``(..., C, H, W)`` uint8 -> short side ``size``, aspect ratio kept (long side truncated)."""
    _check_uint8(x)
    if min(x.shape[-2:]) == size:
        return x
    return _resize(x, [size])


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central ``size x size`` window of ``(..., C, H, W)``; top/left round down."""
    _check_uint8(x)
    height, width = x.shape[-2:]
    if size > height or size > width:
        raise ValueError(f"cannot take a {size}x{size} crop from frames of {height}x{width}")
    top, left = _corner_offset("center", height, width, size, size)
    return x[..., top : top + size, left : left + size]


def center_view(x: Tensor, input_size: int = 224, short_side: int | None = None) -> Tensor:
    """Single test view: resize the short side, then take the central ``input_size`` square.

    ``short_side`` defaults to ``round(input_size * 256 / 224)`` (256 for 224, TSN's
    ``scale_size``), the ratio [STFN] §4.2 trains with.

    Returns:
        ``(..., C, input_size, input_size)`` uint8.
    """
    if short_side is None:
        short_side = round(input_size * 256 / 224)
    if short_side < input_size:
        raise ValueError(f"short_side {short_side} is smaller than input_size {input_size}")
    return center_crop(resize_short_side(x, short_side), input_size)


def ten_crop(x: Tensor, input_size: int = 224, *, is_flow: bool = False) -> Tensor:
    """TSN's 10 test views: 4 corners and centre, each also mirrored, without resizing.

    Resize the short side first (e.g. :func:`resize_short_side` to 256) as TSN's
    ``GroupOverSample`` does. Views are in torchvision's ``ten_crop`` order: top-left,
    top-right, bottom-left, bottom-right, centre, then the same five flipped. Flipped flow views
    get ``255 - x`` on the x channels.

    Args:
        x: ``(..., C, H, W)`` uint8 with ``H, W >= input_size``.

    Returns:
        ``(10, ..., C, input_size, input_size)`` uint8, e.g. ``(10, T, C, h, w)``.
    """
    _check_uint8(x)
    height, width = x.shape[-2:]
    if input_size > height or input_size > width:
        raise ValueError(f"cannot take {input_size}x{input_size} crops from frames of {height}x{width}")
    views = []
    for position in CROP_POSITIONS:
        top, left = _corner_offset(position, height, width, input_size, input_size)
        views.append(x[..., top : top + input_size, left : left + input_size])
    views += [flip_horizontal(v, is_flow=is_flow) for v in views]
    return torch.stack(views)


class MultiScaleCornerCrop:
    """Training augmentation of [STFN] §4.2 as a callable: ``crop(x, rng) -> (..., C, s, s)``.

    One call draws one :class:`CropParams` and applies it to all of ``x``. To give frames and
    flow of one sample the same augmentation, call :func:`sample_crop_params` once and
    :func:`apply_crop` on each. The generator is an argument, not state, so that each
    DataLoader worker passes its own.
    """

    def __init__(
        self,
        input_size: int = 224,
        *,
        scales: Sequence[int] = CROP_SCALES,
        base_size: int = 256,
        is_flow: bool = False,
    ) -> None:
        self.input_size = input_size
        self.scales = tuple(scales)
        self.base_size = base_size
        self.is_flow = is_flow

    def __call__(self, x: Tensor, rng: np.random.Generator) -> Tensor:
        params = sample_crop_params(x.shape[-2], x.shape[-1], rng, scales=self.scales, base_size=self.base_size)
        return apply_crop(x, params, self.input_size, is_flow=self.is_flow)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, scales={self.scales}, "
            f"base_size={self.base_size}, is_flow={self.is_flow})"
        )


# --------------------------------------------------------------------------------------------
# FstCN ([FstCN] §2.4 Fig. 3, §2.5): a fixed-size random crop in training, a 3 x 3 grid of crops at test
# --------------------------------------------------------------------------------------------

__all__ += ["GRID_POSITIONS", "grid_crop", "grid_offsets", "sample_random_crop"]

#: [FstCN] Fig. 3: "top left, top middle, top right, middle left, middle, middle right, bottom left, bottom
#: middle, bottom right", the order of :func:`grid_crop`'s first 9 views.
GRID_POSITIONS = ("top_left", "top_middle", "top_right", "middle_left", "middle", "middle_right",
                  "bottom_left", "bottom_middle", "bottom_right")


def grid_offsets(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """(top, left) of the 9 ``size x size`` crops of a 3 x 3 grid, in :data:`GRID_POSITIONS` order.

    Rows start at ``0``, ``(height - size) // 2`` and ``height - size``; columns likewise over the width: the
    crops touch the borders and the middle one is the centre crop (rounded down, as :func:`center_crop`).
    """
    if size < 1 or size > height or size > width:
        raise ValueError(f"cannot take {size}x{size} crops from frames of {height}x{width}")
    rows = (0, (height - size) // 2, height - size)
    cols = (0, (width - size) // 2, width - size)
    return [(top, left) for top in rows for left in cols]


def grid_crop(x: Tensor, size: int) -> Tensor:
    """[FstCN]'s 18 test views (Fig. 3): 9 crops on a 3 x 3 grid, then the same 9 mirrored.

    Every frame of ``x`` (a clip and its V_diff alike) is cropped at the same place; no resizing (resize the
    frames first if they should be). A mirrored |difference| is the |difference| of the mirrored frames, so
    V_diff takes the same views.

    Args:
        x: ``(..., C, H, W)`` uint8 with ``H, W >= size``, e.g. ``(l_t, 3, H, W)``.

    Returns:
        ``(18, ..., C, size, size)`` uint8: view ``v < 9`` at :func:`grid_offsets` ``[v]``, view ``9 + v`` its
        mirror image.
    """
    _check_uint8(x)
    views = [x[..., top : top + size, left : left + size] for top, left in grid_offsets(*x.shape[-2:], size)]
    return torch.stack(views + [v.flip(-1) for v in views])


def sample_random_crop(height: int, width: int, size: int, rng: np.random.Generator) -> CropParams:
    """A ``size x size`` crop at a uniformly random place and a flip with probability 0.5 ([FstCN] §2.5: "the
    frames in each pair of video clips are randomly cropped at the same location and flipped simultaneously").

    Apply it with :func:`apply_crop` and ``input_size = size`` to every frame of the clip and its V_diff. Draw
    order from ``rng``: top, left, flip.
    """
    if size < 1 or size > height or size > width:
        raise ValueError(f"cannot take a {size}x{size} crop from frames of {height}x{width}")
    top = int(rng.integers(height - size + 1))
    left = int(rng.integers(width - size + 1))
    return CropParams(top=top, left=left, h=size, w=size, flip=bool(rng.random() < 0.5))


# --------------------------------------------------------------------------------------------
# Test views of the end-to-end networks (``train-net``): the whole frame ([ST-Mult] §4.2), a centre crop, or
# TSN's ten crops, each with its horizontal flip
# --------------------------------------------------------------------------------------------

__all__ += ["EVAL_SPACES", "eval_short_side", "eval_spatial_views"]

#: The spatial test views an end-to-end network may ask for (:func:`eval_spatial_views`).
EVAL_SPACES = ("full", "center", "ten_crop")


def eval_short_side(input_size: int) -> int:
    """The short side test frames are resized to: ``round(input_size * 256 / 224)``, 256 for 224 (the ratio of
    [ST-Mult] §4.2's "smallest side rescaled to 256" to its 224 training crops, and TSN's ``scale_size``)."""
    if input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    return round(input_size * 256 / 224)


def eval_spatial_views(x: Tensor, space: str, input_size: int, *, flips: bool = True,
                       is_flow: bool = False) -> Tensor:
    """The spatial test views of one sample, the same for all its frames.

    Args:
        x: ``(..., C, H, W)`` uint8 at the stored resolution.
        space: ``full``: the whole frame with its short side resized to :func:`eval_short_side` (a fully
            convolutional network, [ST-Mult] §4.2: "smallest side rescaled to 256"); ``center``:
            :func:`center_view`; ``ten_crop``: :func:`ten_crop` of that resized frame (its own 5 flips).
        input_size: the training crop side.
        flips: add each view's horizontal mirror image (flow: ``255 - x`` on the x channels).

    Returns:
        ``(V, ..., C, h, w)`` uint8: V = 2 with flips (the view, then its mirror), else 1 (10 / 5 for
        ``ten_crop``).
    """
    _check_uint8(x)
    if space == "ten_crop":
        views = ten_crop(resize_short_side(x, eval_short_side(input_size)), input_size, is_flow=is_flow)
        return views if flips else views[:5]
    if space == "full":
        view = resize_short_side(x, eval_short_side(input_size))
    elif space == "center":
        view = center_view(x, input_size)
    else:
        raise ValueError(f"unknown test view {space!r}; valid: {', '.join(EVAL_SPACES)}")
    views = [view, flip_horizontal(view, is_flow=is_flow)] if flips else [view]
    return torch.stack(views)
