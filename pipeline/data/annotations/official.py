"""The one loader shape of the datasets with official split files (UCF101, HMDB51; [STFN] §4.1 evaluates on
their three splits).

A format (:class:`OfficialFormat`, one per dataset module) says where its split files are and how to read
them: the classes, and each listed video with its label and split. :func:`load_official` does the rest the same
way for both: find each listed video on disk (:class:`~pipeline.data.annotations.base.DiskIndex`, or the frame
folders of a rawframes tree), refuse a video listed twice, record or refuse the missing ones, and mark the
videos on disk that no split file names ``"unused"``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from pipeline.data.annotations.base import (
    Dataset,
    DatasetError,
    DiskIndex,
    VideoRecord,
    absolute,
    check_split_id,
    finish,
    handle_missing,
    listing,
    require_dir,
    video_id,
)

__all__ = ["Entry", "OfficialFormat", "SplitLists", "class_lookup", "default_splits_dir", "load_official",
           "unused_records"]


@dataclass(frozen=True)
class Entry:
    """One video a split file names."""

    list_path: Path
    line: int
    listed: str  # ``<Class>/<video file>`` as listed: looked up on disk, and named when missing
    shown: str  # how a "listed twice" message names it (as written in the file)
    label: int
    split: str  # train, test or unused


@dataclass(frozen=True)
class SplitLists:
    """What the split files of one split say."""

    classes: list[str]
    class_source: Path  # where the classes come from, named for a folder on disk that is no class
    source: str  # the split's files, as a message about missing videos names them
    entries: Iterator[Entry]  # read lazily, in file order, each line checked as it is read


@dataclass(frozen=True)
class OfficialFormat:
    """A dataset with official split files."""

    kind: str  # the dataset kind, e.g. "ucf101"
    title: str  # its name in messages, e.g. "UCF101"
    splits_folder: str  # the official archive's folder, looked for in the root when no splits folder is given
    read: Callable[[Path, int], SplitLists]  # (splits folder, split) -> its lists; MissingSplitFile when absent
    group: Callable[[str, str], str | None]  # (file name without extension, class name) -> the video's group


def class_lookup(classes: Sequence[str]) -> dict[str, int]:
    """Class name -> index, with lower-case aliases for case-insensitive folder names."""
    lookup = {name.lower(): i for i, name in enumerate(classes)}
    lookup.update({name: i for i, name in enumerate(classes)})
    return lookup


def unused_records(
    index, used: set[str], lookup: dict[str, int], classes: Sequence[str], source: Path, group_of
) -> list[VideoRecord]:
    """Videos on disk that the split lists do not name."""
    records, strays = [], defaultdict(int)
    for rel in sorted(index.files - used):
        folder = rel.split("/", 1)[0]
        label = lookup.get(folder, lookup.get(folder.lower()))
        if label is None:
            strays[folder] += 1
            continue
        vid = video_id(rel)
        stem = vid.rsplit("/", 1)[-1]
        records.append(
            VideoRecord(vid, index.root / rel, label, classes[label], "unused", group_of(stem, classes[label]) or vid)
        )
    if strays:
        listed = [f"{folder} ({n} videos)" for folder, n in sorted(strays.items())]
        raise DatasetError(
            f"folders under {index.root} hold videos but are not classes in {source}: {listing(listed)}"
        )
    return records


def default_splits_dir(root: Path, candidates: Sequence[str]) -> Path:
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    return root


def load_official(
    form: OfficialFormat,
    root: str | os.PathLike,
    *,
    splits_dir: str | os.PathLike | None = None,
    split: int = 1,
    allow_missing: bool = False,
    index=None,
) -> Dataset:
    """The dataset of ``form`` at ``root`` with its official split ``split`` (1, 2 or 3).

    ``splits_dir``: by default ``<root>/<form.splits_folder>`` when present, else ``root``. Videos on disk that
    the split's lists do not name are ``"unused"``. Listed videos missing on disk raise a :class:`DatasetError`
    unless ``allow_missing``, in which case they are dropped and recorded in ``Dataset.missing`` (as listed,
    without the label column). ``index`` replaces the scan of the root for video files (an object like
    :class:`~pipeline.data.annotations.base.DiskIndex`: ``root``, ``files``, ``resolve``); a rawframes tree
    passes one over its frame folders (:mod:`pipeline.data.annotations.rawframes`).
    """
    root = absolute(root)
    require_dir(root, f"{form.title} root")
    split = check_split_id(split)
    splits_dir = default_splits_dir(root, [form.splits_folder]) if splits_dir is None else absolute(splits_dir)
    require_dir(splits_dir, f"{form.title} splits folder")
    lists = form.read(splits_dir, split)
    classes = lists.classes
    lookup = class_lookup(classes)
    index = DiskIndex(root) if index is None else index
    records, missing, used = [], [], set()
    for entry in lists.entries:
        rel = index.resolve(entry.listed)
        if rel is None:
            missing.append(entry.listed)
            continue
        if rel in used:
            raise DatasetError(f"{entry.list_path}:{entry.line}: {entry.shown} is listed twice in split {split}")
        used.add(rel)
        vid = video_id(rel)
        name = classes[entry.label]
        group = form.group(vid.rsplit("/", 1)[-1], name) or vid
        records.append(VideoRecord(vid, root / rel, entry.label, name, entry.split, group))
    missing_t = handle_missing(missing, allow_missing, root, lists.source)
    records += unused_records(index, used, lookup, classes, lists.class_source, form.group)
    return finish(form.kind, root, classes, records, split, missing_t)
