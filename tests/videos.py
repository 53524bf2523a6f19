"""Small synthetic videos for tests, written with PyAV (lossless-enough MPEG-4 at low resolution)."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def write_video(path: Path, num_frames: int = 12, size: tuple[int, int] = (64, 48), fps: int = 10,
                seed: int = 0, codec: str = "mpeg4") -> np.ndarray:
    """Write a moving-gradient clip of ``num_frames`` frames (width, height = ``size``); returns its frames."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 200)
    frames = np.stack([np.stack([(x * 3 + t * 4 + base) % 256, (y * 4) % 256, np.full_like(x, 60 + 10 * (t % 10))],
                                -1) for t in range(num_frames)]).astype(np.uint8)
    return write_frames(path, frames, fps, codec)


def write_frames(path: Path, frames: np.ndarray, fps: int = 10, codec: str = "mpeg4") -> np.ndarray:
    """Encode RGB frames (T, H, W, 3) uint8 to ``path``; returns them."""
    h, w = frames.shape[1:3]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"qscale": "2"} if codec == "mpeg4" else {}
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return frames


def moving_texture(axis: str, num_frames: int = 16, size: tuple[int, int] = (64, 48), seed: int = 0,
                   speed: int = 1) -> np.ndarray:
    """(T, H, W, 3) uint8: a random smooth colour texture translating by ``speed`` px per frame along ``axis``
    (``"x"`` or ``"y"``; the sign drawn from ``seed``), wrapping around. Clips of the two axes differ by their
    motion only, and a horizontal flip keeps the axis (as the demo's RedHorizontal / RedVertical)."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.uniform(30, 225, size=(h // 8 + 1, w // 8 + 1, 3))
    tex = np.kron(coarse, np.ones((8, 8, 1)))[:h, :w] + rng.normal(0, 12, size=(h, w, 3))
    tex = np.clip(tex, 0, 255).astype(np.uint8)
    sign = 1 if rng.random() < 0.5 else -1
    return np.stack([np.roll(tex, sign * speed * t, axis=1 if axis == "x" else 0) for t in range(num_frames)])


def make_csv_dataset(root: Path, videos_per_class: int = 3, classes=("Alpha", "Beta"), num_frames: int = 12,
                     size=(64, 48)) -> Path:
    """A CSV-layout dataset of synthetic clips with UCF-style names; returns its root."""
    rows = ["path,label,split"]
    k = 0
    for cls in classes:
        for i in range(videos_per_class):
            rel = f"{cls}/v_{cls}_g{i + 1:02d}_c01.avi"
            write_video(root / rel, num_frames=num_frames, size=size, seed=k)
            rows.append(f"{rel},{cls},{'test' if i == videos_per_class - 1 else 'train'}")
            k += 1
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    return root
