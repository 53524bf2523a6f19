"""A folder per class: ``<root>/<Class>/**/<name>.{avi,mp4,mkv,webm,mov}``, classes sorted.

All videos are train unless ``test_fraction`` is given, in which case whole groups go to test
(:func:`pipeline.data.splits.holdout_groups`, deterministic for a seed).
"""

from __future__ import annotations

import os

from pipeline.data.annotations.base import (
    Dataset,
    DatasetError,
    VideoRecord,
    absolute,
    finish,
    is_video,
    listing,
    require_dir,
    ucf_group,
    video_file_problem,
    video_id,
)
from pipeline.data.splits import holdout_groups

__all__ = ["load_folder"]


def load_folder(
    root: str | os.PathLike, *, test_fraction: float | None = None, seed: int = 0, allow_missing: bool = False
) -> Dataset:
    """``<root>/<Class>/**/<video>`` with classes sorted by name.

    All videos are ``"train"`` when ``test_fraction`` is None or 0; otherwise whole groups
    (UCF-style ``_gNN_`` names, else one group per video) are moved to ``"test"`` by
    :func:`holdout_groups` with ``seed``. A video file that cannot be read (a dangling symlink, a fifo) is an
    error naming it, or with ``allow_missing`` an entry of :attr:`Dataset.missing` ("Class/v.avi (dangling
    symlink -> /gone/v.avi)").
    """
    root = absolute(root)
    require_dir(root, "dataset root")
    if test_fraction is not None and not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in [0, 1), got {test_fraction}")
    with os.scandir(root) as top:
        folders = sorted(e.name for e in top if e.is_dir() and not e.name.startswith("."))
    found: list[tuple[str, str]] = []  # (class, relative path)
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(root / folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            found += [(folder, f"{rel_dir}/{name}") for name in filenames if is_video(name)]
    classes = sorted({c for c, _ in found})
    label_of = {c: i for i, c in enumerate(classes)}
    records, missing = [], []
    for class_name, rel in found:
        problem = video_file_problem(root / rel)
        if problem:  # a dangling symlink (its target named), a fifo, ...: cannot be decoded
            missing.append(f"{rel} ({problem})")
            continue
        vid = video_id(rel)
        group = ucf_group(vid.rsplit("/", 1)[-1]) or vid
        records.append(VideoRecord(vid, root / rel, label_of[class_name], class_name, "train", group))
    if test_fraction:
        held = holdout_groups(records, test_fraction, seed=seed)
        records = [
            VideoRecord(r.video_id, r.path, r.label, r.class_name, "test", r.group) if r.group in held else r
            for r in records
        ]
    if missing and not allow_missing:
        raise DatasetError(f"{len(missing)} video file(s) under {root} cannot be read: {listing(missing)}; fix or "
                           "remove them, or allow missing videos (--allow-missing, or allow_missing=True) to go on "
                           "without them")
    return finish("folder", root, classes, records, None, tuple(missing))
