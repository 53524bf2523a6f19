"""mmaction2 / TSN lists (kind ``list``), one file per split: ``path label`` (a video list) or
``dir num_frames label`` (a rawframe list, ``dir`` naming a video by its path without extension), labels
0-based (:func:`load_video_list`). The rawframes kind reads its lists with the same reader
(:func:`read_video_list`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.data.annotations.base import (
    COUNT,
    INTEGER,
    Dataset,
    DatasetError,
    Folders,
    VideoRecord,
    absolute,
    existing_file,
    finish,
    handle_missing,
    id_under,
    integer_classes,
    name_group,
    read_classes_file,
    read_lines,
    require_dir,
    split_files,
)

__all__ = ["ListRow", "index_classes", "load_video_list", "read_video_list"]


@dataclass(frozen=True)
class ListRow:
    """One line of an mmaction2 / TSN list: ``path label``, or ``dir num_frames label`` (``num_frames`` None
    for the first)."""

    line: int
    name: str
    num_frames: int | None
    label: int


def read_video_list(path: Path) -> list[ListRow]:
    """The lines of an mmaction2 / TSN list, whitespace-separated: ``path label`` (mmaction2's video list) or
    ``dir num_frames label`` (mmaction2's and TSN's rawframe list), with 0-based integer labels. The first line
    sets the column count, and every line must have it. A bad line is a :class:`DatasetError` naming
    ``path:line``."""
    rows, first = [], None
    for n, line in read_lines(path):
        parts = line.split()
        if len(parts) not in (2, 3):
            raise DatasetError(f"{path}:{n}: expected 'path label' or 'dir num_frames label', got {line!r}")
        first = first or (n, len(parts))
        if len(parts) != first[1]:
            raise DatasetError(f"{path}:{n}: {len(parts)} columns, but line {first[0]} has {first[1]}; a list is "
                               "'path label' or 'dir num_frames label' on every line")
        label = parts[-1]
        if not INTEGER.fullmatch(label):
            raise DatasetError(f"{path}:{n}: label {label!r} is not an integer")
        if int(label) < 0:
            raise DatasetError(f"{path}:{n}: label {label} is negative (labels are 0-based class indices)")
        if len(parts) == 3 and not COUNT.fullmatch(parts[1]):
            raise DatasetError(f"{path}:{n}: num_frames {parts[1]!r} is not a whole number")
        rows.append(ListRow(n, parts[0], int(parts[1]) if len(parts) == 3 else None, int(label)))
    return rows


def index_classes(rows: Sequence[tuple[Path, ListRow]], classes_file: Path | None) -> list[str]:
    """Classes of 0-based integer labels: ``classes_file``'s names (every label must index one), else
    ``"0".."C-1"`` (the labels must be exactly 0..C-1)."""
    if classes_file is None:
        sources = ", ".join(dict.fromkeys(str(p) for p, _ in rows))
        return integer_classes(sources, [str(r.label) for _, r in rows], names_allowed=False)
    classes = read_classes_file(classes_file)
    for path, row in rows:
        if row.label >= len(classes):
            raise DatasetError(f"{path}:{row.line}: label {row.label} but {classes_file} names {len(classes)} classes")
    return classes


def load_video_list(
    root: str | os.PathLike,
    *,
    train_list: str | os.PathLike | None = None,
    test_list: str | os.PathLike | None = None,
    classes_file: str | os.PathLike | None = None,
    allow_missing: bool = False,
) -> Dataset:
    """mmaction2 / TSN lists (:func:`read_video_list`), one per split: ``train_list`` -> train, ``test_list`` ->
    test.

    * ``path label``: a video file relative to ``root`` (or absolute).
    * ``dir num_frames label``: a video named by its path without extension relative to ``root`` (a rawframe
      list's frame folder, e.g. ``ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01``), resolved to the one video file
      with that stem; ``num_frames`` is not used.

    A listed file that is absent is also looked for by its stem with any video extension (a dataset re-encoded
    to ``.mp4``). Classes: ``classes_file``'s names (one per line, or ``classInd.txt``), else ``"0".."C-1"``
    with the labels exactly 0..C-1. Groups from UCF101 / HMDB51 names, else the video id. Missing videos as in
    :func:`~pipeline.data.annotations.csvlist.load_csv`.
    """
    root = absolute(root)
    require_dir(root, "dataset root")
    files = split_files("list", train_list, test_list, "list")
    classes_file = existing_file(classes_file, "classes file")
    rows = [(path, split, row) for split, path in files for row in read_video_list(path)]
    classes = index_classes([(path, row) for path, _, row in rows], classes_file)
    folders = Folders()
    records, missing = [], []
    for path, split, row in rows:
        video = folders.by_stem(absolute(root / row.name), f"{path}:{row.line}")
        if video is None:
            missing.append(row.name)
            continue
        vid = id_under(root, video)
        name = classes[row.label]
        records.append(VideoRecord(vid, video, row.label, name, split, name_group(vid, name)))
    missing_t = handle_missing(missing, allow_missing, root, ", ".join(str(p) for _, p in files))
    return finish("list", root, classes, records, None, missing_t)
