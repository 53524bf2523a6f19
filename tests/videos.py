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
