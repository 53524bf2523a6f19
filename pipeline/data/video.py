"""Video decoding with PyAV: every frame, resized so that the short side has a given length, as RGB uint8.

PyAV's ``frame.to_ndarray(format="rgb24")`` builds a new swscale converter for every frame. We keep one
:class:`av.video.reformatter.VideoReformatter` per video and let it convert and resize in a single
``sws_scale`` call, which is what makes decode + resize fast (see ``bench/decode.py``).

Completeness: a damaged or cut download often still opens and yields a few frames. :func:`decode_video`
compares the frames it decoded with what the container declares (the stream's frame count, else its duration
times its frame rate, see :func:`declared_frames`) and with any decode error met on the way; a video short by
more than ``truncation_tolerance`` of its declared frames raises :class:`VideoTruncated` naming the file and
the counts, or, with ``allow_truncated``, comes back with :attr:`DecodedVideo.truncated` saying so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipeline.data.annotations.base import video_file_problem


class VideoDecodeError(RuntimeError):
    """A video cannot be decoded (unreadable, truncated, no video stream, zero frames)."""


class VideoTruncated(VideoDecodeError):
    """Fewer frames decoded than the container declares, by more than the tolerance."""


#: Default largest fraction of the declared frames a video may lack and still count as complete.
TRUNCATION_TOLERANCE = 0.05


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    fps: float
    source_size: tuple[int, int]  # (width, height) as stored in the file
    codec: str
    declared: int = 0  # frames the container declares (0: it declares nothing usable)
    declared_from: str = ""  # "frame count" or "duration x rate"
    decode_error: str | None = None  # the error that stopped decoding early, if any
    truncated: str | None = None  # why the video counts as truncated (only with allow_truncated)
    #: Where the frame size changed mid-stream ("frame 30: 96x72 -> 48x36"); every frame is stored at the size
    #: the first frame gives (a changed aspect is stretched to it), and the change is recorded, not hidden.
    size_changes: list[str] = field(default_factory=list)


def declared_frames(container, stream) -> tuple[int, str]:
    """(frames, how) the container declares for ``stream``: the stream's frame count when the header has one,
    else its duration (the stream's, else the container's) times the average frame rate; (0, "") if neither."""
    if stream.frames and stream.frames > 0:
        return int(stream.frames), "frame count"
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        return 0, ""
    seconds = None
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration and container.duration > 0:
        seconds = container.duration / 1_000_000  # av.time_base is microseconds
    if not seconds or seconds <= 0:
        return 0, ""
    return int(round(seconds * float(Fraction(rate)))), "duration x rate"


def shortfall(decoded: int, declared: int, declared_from: str, error: str | None, *, tolerance: float,
              max_frames: int = 0) -> str | None:
    """Why ``decoded`` frames are too few, or None when the video is complete within ``tolerance``.

    A count read from the header must be met within ``tolerance`` x declared frames; one estimated from
    duration x rate gets one frame of rounding slack on top. With ``max_frames`` the expectation is capped
    there. A decode error that stopped the video before the expectation is named in the message; an error
    when the container declares nothing makes the video truncated (nothing says how much is missing).
    """
    if max_frames and decoded >= max_frames:
        return None
    expected = min(declared, max_frames) if max_frames and declared else declared
    why = f" (decoding stopped at: {error})" if error else ""
    if expected <= 0:
        return f"decoded {decoded} frames, the container declares no frame count{why}" if error else None
    slack = tolerance * expected + (1 if declared_from == "duration x rate" else 0)
    if expected - decoded > slack:
        return f"decoded {decoded} of {expected} declared frames ({declared_from}){why}"
    return None


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


def decode_video(path: Path | str, *, short_side: int = 256, max_frames: int = 0,
                 truncation_tolerance: float = TRUNCATION_TOLERANCE, allow_truncated: bool = False) -> DecodedVideo:
    """Decode every frame of the first video stream of ``path``.

    Args:
        path: any container/codec FFmpeg reads (XviD AVI, H.264 MP4, with or without audio).
        short_side: resize so the shorter side has this many pixels (aspect kept); 0 keeps the source size.
        max_frames: stop after this many frames (0: all).
        truncation_tolerance: fraction of the declared frames a video may lack (module docstring).
        allow_truncated: return a truncated video (with ``truncated`` set) instead of raising.
    Returns:
        DecodedVideo with frames (T, H, W, 3) uint8 RGB and the declared frame count.
    Raises:
        VideoDecodeError naming the file when it is unreadable, has no video stream or yields no frame;
        VideoTruncated when it is short of its declared frames (unless ``allow_truncated``).
    """
    import av
    from av.video.reformatter import Interpolation, VideoReformatter

    path = Path(path)
    if not (math.isfinite(truncation_tolerance) and 0.0 <= truncation_tolerance < 1.0):
        raise ValueError(f"truncation_tolerance must be in [0, 1), got {truncation_tolerance}")
    problem = video_file_problem(path)
    if problem:  # absent, a dangling symlink, a fifo (which PyAV would wait on forever)
        raise VideoDecodeError(f"{path}: {problem}")
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
        declared, declared_from = declared_frames(container, stream)
        reformatter = VideoReformatter()
        size = None
        error = None
        changes: list[str] = []
        try:
            for frame in container.decode(stream):
                if size is None:
                    src_w, src_h = frame.width, frame.height
                    size, last = resized_size(src_w, src_h, short_side), (src_w, src_h)
                elif (frame.width, frame.height) != last:
                    changes.append(f"frame {len(frames)}: {last[0]}x{last[1]} -> {frame.width}x{frame.height} "
                                   f"(stored at {size[0]}x{size[1]}, the first frame's)")
                    last = (frame.width, frame.height)
                # AREA averages when shrinking (no aliasing); it is swscale's good default for downscaling.
                out = reformatter.reformat(frame, width=size[0], height=size[1], format="rgb24",
                                           interpolation=Interpolation.AREA)
                frames.append(out.to_ndarray())
                if max_frames and len(frames) >= max_frames:
                    break
        except av.error.FFmpegError as e:
            if not frames:
                raise VideoDecodeError(f"{path}: cannot decode ({e})") from e
            # A damaged tail after good frames: the completeness check below decides whether it matters.
            error = f"{type(e).__name__}: {e}"
        if not frames:
            raise VideoDecodeError(f"{path}: no frames could be decoded (empty or truncated video)")
        codec = stream.codec_context.name
    finally:
        container.close()
    short = shortfall(len(frames), declared, declared_from, error, tolerance=truncation_tolerance,
                      max_frames=max_frames)
    if short and not allow_truncated:
        raise VideoTruncated(f"{path}: truncated or damaged: {short}; allow truncated videos "
                             "(--allow-truncated) to keep what decodes")
    return DecodedVideo(np.stack(frames), fps, (src_w, src_h), codec, declared, declared_from, error, short,
                        changes)
