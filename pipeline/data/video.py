"""Video decoding with PyAV: every frame, resized so that the short side has a given length, as RGB uint8.

PyAV's ``frame.to_ndarray(format="rgb24")`` builds a new swscale converter for every frame. We keep one
:class:`av.video.reformatter.VideoReformatter` per video and let it convert and resize in a single
``sws_scale`` call, which is what makes decode + resize fast (see ``bench/decode.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np


class VideoDecodeError(RuntimeError):
    """A video cannot be decoded (unreadable, truncated, no video stream, zero frames)."""


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    fps: float
    source_size: tuple[int, int]  # (width, height) as stored in the file
    codec: str


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to ``short_side`` and the aspect ratio kept, both even.

    ``short_side <= 0`` keeps the source size. Even sizes keep 4:2:0 video encoders and crops simple.
    """
    if short_side <= 0:
        return width, height
    if width <= height:
        w, h = short_side, round(height * short_side / width)
    else:
        w, h = round(width * short_side / height), short_side
    return max(2, w - w % 2), max(2, h - h % 2)


def decode_video(path: Path | str, *, short_side: int = 256, max_frames: int = 0) -> DecodedVideo:
    """Decode every frame of the first video stream of ``path``.

    Args:
        path: any container/codec FFmpeg reads (XviD AVI, H.264 MP4, with or without audio).
        short_side: resize so the shorter side has this many pixels (aspect kept); 0 keeps the source size.
        max_frames: stop after this many frames (0: all).
    Returns:
        DecodedVideo with frames (T, H, W, 3) uint8 RGB.
    Raises:
        VideoDecodeError naming the file when it is unreadable, has no video stream or yields no frame.
    """
    import av
    from av.video.reformatter import Interpolation, VideoReformatter

    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(f"{path}: file not found")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoDecodeError(f"{path}: cannot open ({e})") from e
    frames: list[np.ndarray] = []
    try:
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(Fraction(rate)) if rate else 0.0
        src_w, src_h = stream.codec_context.width, stream.codec_context.height
        reformatter = VideoReformatter()
        size = None
        try:
            for frame in container.decode(stream):
                if size is None:
                    src_w, src_h = frame.width, frame.height
                    size = resized_size(src_w, src_h, short_side)
                # AREA averages when shrinking (no aliasing); it is swscale's good default for downscaling.
                out = reformatter.reformat(frame, width=size[0], height=size[1], format="rgb24",
                                           interpolation=Interpolation.AREA)
                frames.append(out.to_ndarray())
                if max_frames and len(frames) >= max_frames:
                    break
        except av.error.FFmpegError as e:
            if not frames:
                raise VideoDecodeError(f"{path}: cannot decode ({e})") from e
            # A damaged tail after good frames: keep what decoded, as OpenCV and ffmpeg do.
        if not frames:
            raise VideoDecodeError(f"{path}: no frames could be decoded (empty or truncated video)")
        codec = stream.codec_context.name
    finally:
        container.close()
    return DecodedVideo(np.stack(frames), fps, (src_w, src_h), codec)
