"""The video table that ``decode`` writes beside the frames and every later stage reads.

``<decode dir>/videos.json`` holds the class names, and per video its id, label, group, source path, frame
count, fps and frame size, plus the split membership for every split the dataset defines (UCF101 and HMDB51
have three official splits; other layouts one). Later stages choose a split with their ``--split`` option,
so decoding once serves all three splits. In each split's membership the validation hold-out
(:mod:`pipeline.data.splits`) reads ``"val"``: every stage fits on ``"train"`` and validates on ``"val"``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.io.atomic import write_text
from pipeline.stage.keys import TABLE


@dataclass
class VideoTable:
    dataset: str
    root: str
    classes: list[str]
    video_ids: list[str]
    labels: list[int]
    groups: list[str]
    sources: list[str]
    splits: dict[str, list[str]]  # split id ("1", "2", "3") -> per-video "train" | "val" | "test" | "unused"
    num_frames: list[int] = field(default_factory=list)
    fps: list[float] = field(default_factory=list)
    sizes: list[list[int]] = field(default_factory=list)  # [height, width] of the stored frames
    missing: dict[str, list[str]] = field(default_factory=dict)  # split id -> listed but absent videos

    def __len__(self) -> int:
        return len(self.video_ids)

    def split_of(self, split: int | str) -> list[str]:
        key = str(split)
        if key not in self.splits:
            raise KeyError(f"split {key} is not defined for this dataset (available: {', '.join(self.splits)})")
        return self.splits[key]

    def indices(self, split: int | str, which: str) -> np.ndarray:
        """Row indices of the videos in ``which`` of split ``split``: "train" (fitted on), "val" (the one
        validation hold-out, :mod:`pipeline.data.splits`), "test", "unused", or "train+val" (both)."""
        wanted = {"train", "val"} if which == "train+val" else {which}
        membership = self.split_of(split)
        return np.array([i for i, s in enumerate(membership) if s in wanted], dtype=np.int64)

    def save(self, folder: Path) -> Path:
        return write_text(Path(folder) / TABLE, json.dumps(asdict(self)))

    @classmethod
    def load(cls, folder: Path) -> "VideoTable":
        path = Path(folder) / TABLE
        if not path.exists():
            raise FileNotFoundError(f"{path}: video table not found (run `pipeline decode` first)")
        return cls(**json.loads(path.read_text()))
