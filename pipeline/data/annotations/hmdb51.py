"""HMDB51 with its official splits ([STFN] §4.1).

``<root>/<class>/<clip>.avi`` with the official ``<class>_test_split{1,2,3}.txt`` files (tag 1 = train,
2 = test, 0 = unused). Class order: TSN's ``class_list.txt`` (``pyActionRecog/benchmark_db.py``) when the
splits folder has one, otherwise the sorted class names, as mmaction2 does. The two orders differ only by two
swaps: TSN's list puts ``kick_ball`` before ``kick`` and ``sword_exercise`` before ``sword``. Group: the source
video's title (:func:`~pipeline.data.annotations.base.hmdb_group`).
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.data.annotations.base import (
    Dataset,
    DatasetError,
    MissingSplitFile,
    hmdb_group,
    listing,
    read_lines,
)
from pipeline.data.annotations.official import Entry, OfficialFormat, SplitLists, load_official

__all__ = ["HMDB51", "load_hmdb51"]

_TAGS = {"0": "unused", "1": "train", "2": "test"}


def _entries(splits_dir: Path, suffix: str, classes: list[str]):
    for label, class_name in enumerate(classes):
        list_path = splits_dir / f"{class_name}{suffix}"
        for n, line in read_lines(list_path):
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or parts[1] not in _TAGS:
                raise DatasetError(f"{list_path}:{n}: expected '<video>.avi <0|1|2>', got {line!r}")
            yield Entry(list_path, n, f"{class_name}/{parts[0]}", parts[0], label, _TAGS[parts[1]])


def _read(splits_dir: Path, split: int) -> SplitLists:
    suffix = f"_test_split{split}.txt"
    split_files = sorted(p for p in splits_dir.iterdir() if p.name.endswith(suffix) and len(p.name) > len(suffix))
    if not split_files:
        raise MissingSplitFile(f"HMDB51 split files not found: no {splits_dir}/<class>{suffix}")
    classes = sorted(p.name[: -len(suffix)] for p in split_files)
    class_list = splits_dir / "class_list.txt"
    if class_list.is_file():
        listed = [line for _, line in read_lines(class_list)]
        if sorted(listed) != sorted(classes):
            extra, absent = sorted(set(listed) - set(classes)), sorted(set(classes) - set(listed))
            raise DatasetError(
                f"{class_list} does not match the {suffix} files: only in the list: {listing(extra) or '-'}; "
                f"only as split files: {listing(absent) or '-'}"
            )
        classes = listed
    return SplitLists(classes, splits_dir, f"{splits_dir}/<class>{suffix}", _entries(splits_dir, suffix, classes))


HMDB51 = OfficialFormat("hmdb51", "HMDB51", "testTrainMulti_7030_splits", _read, hmdb_group)


def load_hmdb51(
    root: str | os.PathLike,
    *,
    splits_dir: str | os.PathLike | None = None,
    split: int = 1,
    allow_missing: bool = False,
    index=None,
) -> Dataset:
    """HMDB51 with its official split ``split`` (1, 2 or 3).

    ``splits_dir`` holds ``<class>_test_split{1,2,3}.txt`` (and optionally TSN's ``class_list.txt``, whose order
    then gives the labels; else class names are sorted); by default ``<root>/testTrainMulti_7030_splits`` when
    present, else ``root``. Tags: 1 train, 2 test, 0 unused; videos on disk named by no split file are
    ``"unused"`` too. Missing videos and ``index`` as in :func:`~pipeline.data.annotations.official.load_official`.
    """
    return load_official(HMDB51, root, splits_dir=splits_dir, split=split, allow_missing=allow_missing, index=index)
