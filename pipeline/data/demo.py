"""The built-in synthetic demo dataset: small clips whose classes need appearance, motion and order.

Eight classes of one textured disc moving over a textured background (see ``docs/demo.md``):

* ``RedHorizontal``, ``RedVertical``, ``CyanHorizontal``, ``CyanVertical`` -- colour x motion axis
  (direction random along the axis): a frame tells the colour, a flow field the axis, and only both
  together the class.
* ``LeftThenRight``, ``RightThenLeft`` (a green disc) -- the same frames and the same motion,
  circularly shifted by half a clip: the order of motion decides, and it is visible only in a window
  that straddles the turn.
* ``RedThenCyan``, ``CyanThenRed`` (diagonal motion) -- the same frames in reverse order: the colour
  switch is instantaneous and red and cyan have the same grey level, so no single frame and no flow
  stack shows the order; only a model of the whole clip's time course does.

A clip is rendered from a plan of per-frame quantities evaluated at clip times ``tau``. The second
class of each order pair is the first class's plan at permuted times (``tau`` rolled by half a clip, or
reversed), so with the same random draws a pair's clips hold exactly the same frames in another order.

:func:`make_demo` writes ``<root>/<Class>/v_<Class>_g<GG>_c<CC>.mp4`` (real H.264 through PyAV),
``<root>/list.csv`` (``path,label,split,group``) and ``<root>/demo.json``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import zlib
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from pipeline.io.atomic import atomic_dir, atomic_write, write_text

__all__ = [
    "CYAN",
    "DEMO_CLASSES",
    "GENERATOR_VERSION",
    "GREEN",
    "ORDER_PAIRS",
    "RED",
    "DemoParams",
    "demo_clip_rng",
    "group_background",
    "make_demo",
    "render_clip",
    "render_demo_clip",
    "video_encoder",
]

# Bump when the rendered frames or the written files would change for the same parameters.
GENERATOR_VERSION = "2"  # 2: x264 ultrafast, one thread: byte-reproducible files

DEMO_CLASSES: tuple[str, ...] = (
    "RedHorizontal",
    "RedVertical",
    "CyanHorizontal",
    "CyanVertical",
    "LeftThenRight",
    "RightThenLeft",
    "RedThenCyan",
    "CyanThenRed",
)

# (first, second): the second is the first seen at permuted clip times (see _clip_times).
ORDER_PAIRS: tuple[tuple[str, str], ...] = (
    ("LeftThenRight", "RightThenLeft"),
    ("RedThenCyan", "CyanThenRed"),
)

# Red and cyan lie on the line through grey 125 orthogonal to both the BT.601 luma weights and
# (1, 1, 1): the same grey level under cv2's RGB->GRAY (what TV-L1 sees) and the same channel mean,
# so a grey-level flow cannot tell them apart and a colour switch leaves no brightness change.
_HUE_AXIS = np.cross([0.299, 0.587, 0.114], [1.0, 1.0, 1.0])
RED = 125.0 + 150.0 * _HUE_AXIS  # (196.0, 97.2, 81.8)
CYAN = 125.0 - 150.0 * _HUE_AXIS  # (54.0, 152.8, 168.2)
GREEN = np.array([70.0, 160.0, 60.0])

_TEXTURE_AMPLITUDE = 45.0  # grey texture added to the object, in 0..255 levels (keeps colours in range)
_NOISE_SIGMA = 2.0  # per-pixel sensor noise, 0..255 levels


# ----------------------------------------------------------------------------- textures


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int) -> np.ndarray:
    """Zero-mean, unit-std noise (height, width, channels) varying over about ``cells`` cells a side."""
    longest = max(height, width)
    rows, cols = max(2, round(cells * height / longest)), max(2, round(cells * width / longest))
    coarse = rng.standard_normal((rows, cols, channels)).astype(np.float32)
    fine = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).reshape(height, width, channels)
    return (fine - fine.mean()) / (fine.std() + 1e-6)


def group_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A static, low-saturation textured background (height, width, 3) float32 in 0..255.

    A random grey level, coarse blotches, a faint colour tint and fine grain: texture gives TV-L1
    something to hold on to, low saturation keeps the object's hue the only strong colour.
    """
    base = rng.uniform(80.0, 170.0)
    blotches = 25.0 * _smooth_noise(rng, height, width, 6, 1)
    tint = 6.0 * _smooth_noise(rng, height, width, 3, 3)
    grain = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (3, 3), 0.7)
    bg = base + blotches + tint + 10.0 * grain[..., None]
    return np.clip(bg, 0.0, 255.0).astype(np.float32)


def _disc_sprite(rng: np.random.Generator, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """An anti-aliased disc: alpha (S, S) in 0..1 and a zero-mean grey texture (S, S) in levels."""
    size = 2 * math.ceil(radius) + 5
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    alpha = np.clip(radius + 0.5 - np.hypot(xx - c, yy - c), 0.0, 1.0)
    blobs = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 1.2)
    texture = _TEXTURE_AMPLITUDE * np.clip(blobs / (blobs.std() + 1e-6) / 2.0, -1.0, 1.0)
    return alpha, texture.astype(np.float32)


def _square_sprite(rng: np.random.Generator, side: float) -> tuple[np.ndarray, np.ndarray]:
    """A textured grey square (the distractor): alpha (S, S) and a zero-mean texture (S, S)."""
    size = math.ceil(side) + 4
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    edge = np.maximum(np.abs(xx - c), np.abs(yy - c))
    alpha = np.clip(side / 2.0 + 0.5 - edge, 0.0, 1.0)
    blobs = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 1.0)
    texture = 30.0 * np.clip(2.0 * blobs, -1.0, 1.0)
    return alpha, texture.astype(np.float32)


def _paste(frame: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, cx: float, cy: float) -> None:
    """Alpha-composite a sprite centred at sub-pixel (cx, cy) onto ``frame`` (H, W, 3) in place."""
    size = alpha.shape[0]
    offset = (size - 1) / 2.0
    m = np.array([[1.0, 0.0, cx - offset], [0.0, 1.0, cy - offset]], dtype=np.float32)
    h, w = frame.shape[:2]
    a = cv2.warpAffine(alpha, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0.0)
    prem = cv2.warpAffine(rgb * alpha[..., None], m, (w, h), flags=cv2.INTER_LINEAR, borderValue=(0.0, 0.0, 0.0))
    frame *= 1.0 - a[..., None]
    frame += prem


# ----------------------------------------------------------------------------- clip plans


def _tri(u: np.ndarray) -> np.ndarray:
    """Triangle wave of period 1: 1 at u = 0, 0 at u = 1/2."""
    return np.abs(1.0 - 2.0 * np.mod(u, 1.0))


def _clip_times(class_name: str, num_frames: int) -> np.ndarray:
    """Clip time ``tau`` at which each frame evaluates its class's plan (T,).

    The second class of an order pair is the first one's plan at permuted times: ``RightThenLeft``
    rolled by half a clip, ``CyanThenRed`` reversed.
    """
    t = np.arange(num_frames, dtype=np.float64)
    if class_name == "RightThenLeft":
        return np.mod(t + num_frames / 2.0, num_frames)
    if class_name == "CyanThenRed":
        return num_frames - 1.0 - t
    return t


@dataclass(frozen=True)
class _Plan:
    centres: np.ndarray  # (T, 2) object centre (x, y) in pixels
    colours: np.ndarray  # (T, 3) object base colour, RGB levels
    distractor: np.ndarray | None  # (T, 2) distractor centre, or None


def _plan(class_name: str, rng: np.random.Generator, tau: np.ndarray, num_frames: int,
          width: int, height: int, radius: float) -> _Plan:
    """Per-frame object centres and colours for a class at clip times ``tau`` (T,)."""
    T = num_frames
    margin = radius + 2.0
    lo = np.array([margin, margin])
    span = np.array([width - 2.0 * margin, height - 2.0 * margin])
    speed = rng.uniform(1.0, 1.5)  # px/frame: what TV-L1 resolves well at this size
    sign = rng.choice([-1.0, 1.0], size=2)
    free = rng.uniform(0.0, 1.0, size=2)  # start offsets as fractions of the free span
    static = rng.uniform(0.0, 1.0)  # block A: progress fraction along the axis that does not move
    switch = rng.integers(round(T / 3), round(2 * T / 3) + 1)  # block C: first frame of the second colour

    if class_name in ("RedHorizontal", "RedVertical", "CyanHorizontal", "CyanVertical"):
        # The same travel L on both axes, and the still axis at a uniformly random "progress", so a
        # single frame's position has the same distribution whichever axis moves.
        travel = min(speed * (T - 1), 0.9 * span.min())
        progress = travel * tau / max(T - 1, 1)
        axis = 0 if class_name.endswith("Horizontal") else 1
        start = lo + free * (span - travel)
        centres = np.empty((T, 2))
        for a in range(2):
            p = progress if a == axis else np.full(T, static * travel)
            centres[:, a] = start[a] + (p if sign[a] > 0 else travel - p)
        colour = RED if class_name.startswith("Red") else CYAN
        colours = np.repeat(colour[None], T, axis=0)
    elif class_name in ("LeftThenRight", "RightThenLeft"):
        # Left for half a clip, then right; RightThenLeft is the same path half a clip later.
        amplitude = min(speed * T / 2.0, 0.9 * span[0])
        x = lo[0] + free[0] * (span[0] - amplitude) + amplitude * _tri(tau / T)
        y = np.full(T, lo[1] + free[1] * span[1])
        centres = np.stack([x, y], axis=1)
        colours = np.repeat(GREEN[None], T, axis=0)
    elif class_name in ("RedThenCyan", "CyanThenRed"):
        # Straight diagonal at constant speed, red until `switch`; CyanThenRed is it reversed in time.
        travel = min(speed * (T - 1) / math.sqrt(2.0), 0.9 * span.min())
        progress = travel * tau / max(T - 1, 1)
        start = lo + free * (span - travel)
        centres = np.stack([start[a] + (progress if sign[a] > 0 else travel - progress) for a in range(2)], axis=1)
        colours = np.where((tau < switch)[:, None], RED[None], CYAN[None])
    else:
        raise ValueError(f"unknown demo class {class_name!r}; expected one of {', '.join(DEMO_CLASSES)}")

    # A grey square on a slow circular orbit of period T (continuous under the half-clip roll and
    # under reversal): motion the classifier must learn to ignore. Present in half of the clips.
    distractor = None
    if rng.random() < 0.5:
        orbit = rng.uniform(1.5, 3.0)
        centre = rng.uniform([0.15 * width, 0.15 * height], [0.85 * width, 0.85 * height])
        angle = rng.uniform(0.0, 2.0 * math.pi) + rng.choice([-1.0, 1.0]) * 2.0 * math.pi * tau / T
        distractor = centre + orbit * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return _Plan(centres=centres, colours=colours, distractor=distractor)


def render_clip(class_name: str, rng: np.random.Generator, *, num_frames: int = 32, width: int = 96,
                height: int = 72, background: np.ndarray | None = None) -> np.ndarray:
    """Render one clip of a demo class -> uint8 RGB frames (T, H, W, 3).

    Every random choice comes from ``rng`` in a fixed order that does not depend on the class, so the
    same generator state renders the two classes of an order pair from the same draws: their frames
    are then the same set in another order (``RightThenLeft`` = ``LeftThenRight`` rolled by T/2 for
    even T, ``CyanThenRed`` = ``RedThenCyan`` reversed). ``background`` (H, W, 3) float in 0..255 is
    drawn from ``rng`` when not given (the dataset shares one per group).
    """
    if class_name not in DEMO_CLASSES:
        raise ValueError(f"unknown demo class {class_name!r}; expected one of {', '.join(DEMO_CLASSES)}")
    _check_geometry(num_frames, width, height)
    if background is None:
        background = group_background(rng, width, height)
    elif background.shape != (height, width, 3):
        raise ValueError(f"background must have shape {(height, width, 3)}, got {background.shape}")

    radius = rng.uniform(0.10, 0.125) * height
    alpha, texture = _disc_sprite(rng, radius)
    distractor_sprite = _square_sprite(rng, rng.uniform(0.11, 0.15) * height)
    distractor_level = rng.uniform(60.0, 200.0)
    noise = rng.normal(0.0, _NOISE_SIGMA, size=(num_frames, height, width, 3)).astype(np.float32)

    tau = _clip_times(class_name, num_frames)
    plan = _plan(class_name, rng, tau, num_frames, width, height, radius)
    noise_index = np.floor(tau).astype(np.int64) % num_frames

    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frame = background.astype(np.float32, copy=True)
        if plan.distractor is not None:
            d_alpha, d_texture = distractor_sprite
            d_rgb = np.repeat((distractor_level + d_texture)[..., None], 3, axis=2)
            _paste(frame, d_rgb, d_alpha, *plan.distractor[t])
        rgb = plan.colours[t].astype(np.float32)[None, None, :] + texture[..., None]
        _paste(frame, rgb, alpha, *plan.centres[t])
        frame += noise[noise_index[t]]
        frames[t] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return frames


def _check_geometry(num_frames: int, width: int, height: int) -> None:
    if num_frames < 12:
        raise ValueError(f"num_frames must be at least 12 (a 10-frame flow stack plus room), got {num_frames}")
    if width < 48 or height < 36:
        raise ValueError(f"demo frames must be at least 48x36, got {width}x{height}")
    if width % 2 or height % 2:
        raise ValueError(f"demo frame size must be even for yuv420p video, got {width}x{height}")


# ----------------------------------------------------------------------------- the dataset


def _class_key(class_name: str) -> int:
    return zlib.crc32(class_name.encode())


def demo_clip_rng(seed: int, class_name: str, group: int, clip: int) -> np.random.Generator:
    """The generator that renders clip ``clip`` of group ``group`` of a class (both 1-based)."""
    return np.random.default_rng([seed, _class_key(class_name), group, clip])


def _group_rng(seed: int, class_name: str, group: int) -> np.random.Generator:
    return np.random.default_rng([seed, _class_key(class_name), group])


@dataclass(frozen=True)
class DemoParams:
    """Everything that determines the demo's files; stored in ``demo.json``."""

    seed: int = 0
    num_clips: int = 18  # per class
    clips_per_group: int = 3  # UCF101-style groups: clips of a group share a background
    test_fraction: float = 0.3  # of each class's groups, taken from g01 on (UCF101 split 1 tests g01-g07)
    num_frames: int = 32
    fps: int = 12
    width: int = 96
    height: int = 72
    crf: int = 12

    @property
    def num_groups(self) -> int:
        return math.ceil(self.num_clips / self.clips_per_group)

    @property
    def num_test_groups(self) -> int:
        return max(1, round(self.test_fraction * self.num_groups))

    def validate(self) -> None:
        _check_geometry(self.num_frames, self.width, self.height)
        if self.clips_per_group < 1:
            raise ValueError(f"clips_per_group must be >= 1, got {self.clips_per_group}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.num_groups - self.num_test_groups < 2:
            raise ValueError(
                f"num_clips={self.num_clips} with clips_per_group={self.clips_per_group} gives "
                f"{self.num_groups} groups per class, {self.num_test_groups} of them test: need at least 2 "
                "train groups per class (for a group-held-out validation set)")
        if self.fps < 1:
            raise ValueError(f"fps must be >= 1, got {self.fps}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in 0..51, got {self.crf}")

    def clips(self) -> list[tuple[str, int, int]]:
        """(class, group, clip) of every video, groups and clips 1-based, in a fixed order."""
        out = []
        for name in DEMO_CLASSES:
            for index in range(self.num_clips):
                out.append((name, index // self.clips_per_group + 1, index % self.clips_per_group + 1))
        return out


def render_demo_clip(params: DemoParams, class_name: str, group: int, clip: int) -> np.ndarray:
    """The frames (T, H, W, 3) uint8 RGB of one dataset clip, exactly as :func:`make_demo` encodes them."""
    background = group_background(_group_rng(params.seed, class_name, group), params.width, params.height)
    return render_clip(class_name, demo_clip_rng(params.seed, class_name, group, clip),
                       num_frames=params.num_frames, width=params.width, height=params.height,
                       background=background)


def video_encoder() -> str:
    """The encoder PyAV's FFmpeg offers here: ``libx264`` when present, else ``mpeg4``."""
    available = av.codecs_available
    for name in ("libx264", "mpeg4"):
        if name in available:
            return name
    raise RuntimeError("PyAV's FFmpeg has neither a libx264 nor an mpeg4 encoder; cannot write the demo videos")


def _write_video(path: Path, frames: np.ndarray, fps: int, crf: int, codec: str) -> None:
    """Encode RGB frames (T, H, W, 3) to ``path`` atomically (a temporary sibling with the same suffix)."""
    with atomic_dir(path) as tmp:
        with av.open(str(tmp), mode="w") as container:
            if codec == "libx264":
                # "ultrafast" and one thread: x264's "medium" preset gave different bytes from run to run here
                # (3 of 6 encodes of one clip distinct, even single-threaded); ultrafast gave 1 of 6.
                options = {"crf": str(crf), "preset": "ultrafast"}
            else:  # mpeg4: fixed quantiser, 2 is near-lossless
                options = {"qscale": "2"}
            stream = container.add_stream(codec, rate=Fraction(fps), options=options)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.codec_context.thread_count = 1  # threaded encoding is not bit-reproducible
            if codec == "mpeg4":
                stream.codec_context.qscale = 2
            for array in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def _video_relpath(name: str, group: int, clip: int) -> str:
    return f"{name}/v_{name}_g{group:02d}_c{clip:02d}.mp4"


def make_demo(root: str | os.PathLike, *, seed: int = 0, num_clips: int = 18, clips_per_group: int = 3,
              test_fraction: float = 0.3, num_frames: int = 32, fps: int = 12, width: int = 96,
              height: int = 72, crf: int = 12, progress: bool = False) -> Path:
    """Write the demo dataset under ``root`` (idempotent) and return the path of its ``list.csv``.

    ``num_clips`` per class, in groups of ``clips_per_group`` (a group shares a background); about
    ``test_fraction`` of each class's groups, from g01 on, form the test split. Videos are H.264
    (libx264, yuv420p, ``crf``) or, without libx264, MPEG-4 part 2, at ``fps`` frames per second.

    If ``demo.json`` records the same parameters and generator version and every video exists, nothing
    is done. A run that stopped part-way with the same parameters resumes (each video was written
    under a temporary name and renamed). Other parameters regenerate everything.
    """
    params = DemoParams(seed=seed, num_clips=num_clips, clips_per_group=clips_per_group,
                        test_fraction=test_fraction, num_frames=num_frames, fps=fps, width=width,
                        height=height, crf=crf)
    params.validate()
    root = Path(root)
    csv_path, meta_path = root / "list.csv", root / "demo.json"
    codec = video_encoder()
    wanted = {"generator_version": GENERATOR_VERSION, "codec": codec, "params": asdict(params)}
    clips = params.clips()
    relpaths = [_video_relpath(name, g, c) for name, g, c in clips]

    previous = None
    if meta_path.is_file():
        try:
            previous = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
    same = previous is not None and {k: previous.get(k) for k in wanted} == wanted
    if same and previous.get("complete") and csv_path.is_file() and all((root / p).is_file() for p in relpaths):
        return csv_path

    root.mkdir(parents=True, exist_ok=True)
    if not same:
        # Anything written under other parameters is stale: drop our own files, keep anything else.
        meta_path.unlink(missing_ok=True)
        csv_path.unlink(missing_ok=True)
        for name in DEMO_CLASSES:
            for old in (root / name).glob(f"v_{name}_g*_c*.mp4") if (root / name).is_dir() else ():
                old.unlink()
    write_text(meta_path, json.dumps({**wanted, "complete": False}, indent=2) + "\n")

    iterator = zip(clips, relpaths)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(list(iterator), desc="demo videos", unit="video")
    for (name, group, clip), rel in iterator:
        path = root / rel
        if same and path.is_file():
            continue  # written by the interrupted run with these parameters
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_video(path, render_demo_clip(params, name, group, clip), params.fps, params.crf, codec)

    rows = []
    for (name, group, _clip), rel in zip(clips, relpaths):
        split = "test" if group <= params.num_test_groups else "train"
        rows.append((rel, name, split, f"{name}_g{group:02d}"))
    with atomic_write(csv_path, "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("path", "label", "split", "group"))
        writer.writerows(rows)
    write_text(meta_path, json.dumps({**wanted, "complete": True}, indent=2) + "\n")
    return csv_path
