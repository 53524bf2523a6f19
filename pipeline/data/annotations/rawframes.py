"""Frames already extracted by mmaction2, TSN, denseflow or twostreamfusion (kind ``rawframes``): the videos are
the tree's frame folders, labelled by mmaction2 / TSN rawframe lists or by the official UCF101 / HMDB51 split
files (:func:`load_rawframes`).

The tree's layout (where frame folders live, how frames are named) is :mod:`pipeline.interop.rawframes`'s: the
caller passes a :class:`pipeline.interop.rawframes.Layout`, so this module reads labels without knowing the
tools' file names. The frames are checked and copied by ``decode`` (docs/rawframes.md).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from pipeline.data.annotations.base import (
    Dataset,
    DatasetError,
    MissingSplitFile,
    VideoRecord,
    finish,
    handle_missing,
    name_group,
    split_files,
)
from pipeline.data.annotations.hmdb51 import HMDB51
from pipeline.data.annotations.official import load_official
from pipeline.data.annotations.ucf101 import UCF101
from pipeline.data.annotations.videolist import ListRow, index_classes, read_video_list

__all__ = ["LABEL_SOURCES", "FrameDirIndex", "load_lists", "load_rawframes"]

_OFFICIAL = {form.kind: form for form in (UCF101, HMDB51)}
#: What the labels of a rawframes tree come from: mmaction2 / TSN lists, or the official split files.
LABEL_SOURCES = ("lists", *_OFFICIAL)


class FrameDirIndex:
    """The frame folders of a tree, looked up like :class:`pipeline.data.annotations.base.DiskIndex` looks up
    video files, so the official split parsers (:func:`~pipeline.data.annotations.official.load_official`) read a
    rawframes tree: a listed ``Class/v_x.avi`` resolves to ``Class/v_x`` (exact or case-insensitive) or, in a flat
    tree, to ``v_x``. In a flat tree, folders no split file names are not imported (their class is unknown)."""

    def __init__(self, root: Path, dirs: dict[str, Path]):
        self.root = Path(root)
        self.dirs = dirs
        self._lower = {r.lower(): r for r in dirs}
        self._stems: dict[str, list[str]] = defaultdict(list)
        for r in dirs:
            self._stems[r.rsplit("/", 1)[-1].lower()].append(r)
        self._resolved: set[str] = set()

    @property
    def files(self) -> set[str]:
        return {r for r in self.dirs if "/" in r} | self._resolved

    def resolve(self, listed: str) -> str | None:
        key = os.path.splitext(listed)[0].lower()
        found = self._lower.get(key)
        if found is None:
            candidates = self._stems.get(key.rsplit("/", 1)[-1], [])
            found = candidates[0] if len(candidates) == 1 else None
        if found is not None:
            self._resolved.add(found)
        return found


def _list_classes(rows: list[tuple[Path, ListRow, str]], classes_file: Path | None) -> list[str]:
    """``classes_file``'s names, else the classes' folder names when each label has exactly one, else
    ``"0".."C-1"`` (the labels exactly 0..C-1 either way, :func:`pipeline.data.annotations.videolist.index_classes`)."""
    classes = index_classes([(path, row) for path, row, _ in rows], classes_file)
    if classes_file is not None:
        return classes
    folders: dict[int, set[str]] = defaultdict(set)
    for _, row, frame_dir in rows:
        folders[row.label].add(frame_dir.split("/", 1)[0] if "/" in frame_dir else "")
    if all("" not in f for f in folders.values()):
        names = []
        for label in range(len(classes)):
            if len(folders[label]) != 1:
                raise DatasetError(f"label {label} is used for folders {sorted(folders[label])[:5]}; give the "
                                   "class names with --classes")
            names.append(next(iter(folders[label])))
        if len(set(names)) == len(names):
            return names
    return classes


def load_lists(base: Path, train_list: Path | None, test_list: Path | None, *, classes_file: Path | None = None,
               allow_missing: bool = False) -> Dataset:
    """mmaction2 / TSN rawframe lists, lines ``frame_dir total_frames label`` (label 0-based, frame_dir
    relative to ``base`` or absolute; read by :func:`pipeline.data.annotations.videolist.read_video_list`) -> a
    :class:`~pipeline.data.annotations.base.Dataset` (train and test)."""
    base = Path(os.path.abspath(base))
    files = split_files("rawframes", train_list, test_list, "list", "--train-list / --test-list")
    rows = []  # (list file, row, frame_dir text, split)
    for split, path in files:
        for row in read_video_list(path):
            if row.num_frames is None:
                raise DatasetError(f"{path}:{row.line}: expected '<frame_dir> <total_frames> <label>' (label "
                                   "0-based), got 2 columns (a video list's 'path label'?)")
            frame_dir = row.name if os.path.isabs(row.name) else row.name.strip("/")
            rows.append((path, row, frame_dir, split))
    if not rows:
        raise DatasetError("no videos in the rawframes lists (give --train-list and/or --test-list)")
    classes = _list_classes([(path, row, frame_dir) for path, row, frame_dir, _ in rows], classes_file)
    records, missing = [], []
    for path, row, frame_dir, split in rows:
        folder = Path(os.path.abspath(base / frame_dir))
        if not folder.is_dir():
            missing.append(frame_dir)
            continue
        rel = os.path.relpath(folder, base).replace(os.sep, "/")
        vid = rel if not rel.startswith("../") else folder.as_posix().lstrip("/")
        name = classes[row.label]
        records.append(VideoRecord(vid, folder, row.label, name, split, name_group(vid, name)))
    missing_t = handle_missing(missing, allow_missing, base, ", ".join(str(p) for _, p in files))
    return finish("rawframes", base, classes, records, 1, missing_t)


def load_rawframes(root: Path, *, layout=None, label_source: str = "lists", split: int = 1,
                   splits_dir: Path | None = None, train_list: Path | None = None, test_list: Path | None = None,
                   classes_file: Path | None = None, allow_missing: bool = False) -> Dataset:
    """Split ``split`` of the rawframes tree at ``root`` in ``layout`` (a :class:`pipeline.interop.rawframes.Layout`:
    its ``frames_root(root)`` and ``frame_dirs(root)``), labelled by ``label_source``: ``"lists"`` (``train_list``
    / ``test_list``, :func:`load_lists`; one split, so another ``split`` is a :class:`MissingSplitFile`) or an
    official-split dataset (``"ucf101"``, ``"hmdb51"``: its split files in ``splits_dir`` read over the tree's
    frame folders)."""
    if layout is None:
        raise DatasetError("dataset kind 'rawframes' needs the tree's layout (layout=, a "
                           "pipeline.interop.rawframes.Layout)")
    base = layout.frames_root(root)
    if label_source == "lists":
        if split != 1:
            raise MissingSplitFile("rawframes lists define one split")
        if train_list is None and test_list is None:
            raise DatasetError("--dataset rawframes needs --rawframes-train-list / --rawframes-test-list or "
                               "--rawframes-labels ucf101|hmdb51 with the official split files")
        return load_lists(base, train_list, test_list, classes_file=classes_file, allow_missing=allow_missing)
    if label_source not in LABEL_SOURCES:
        raise DatasetError(f"unknown rawframes label source {label_source!r}; choose one of "
                           f"{', '.join(LABEL_SOURCES)}")
    index = FrameDirIndex(base, layout.frame_dirs(root))
    return load_official(_OFFICIAL[label_source], base, splits_dir=splits_dir, split=split,
                         allow_missing=allow_missing, index=index)
