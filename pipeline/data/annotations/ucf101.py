"""UCF101 with its official splits ([STFN] §4.1).

``<root>/<Class>/v_<Class>_gGG_cCC.avi`` with the official ``classInd.txt``, ``trainlist0{1,2,3}.txt`` and
``testlist0{1,2,3}.txt`` (CRLF line endings are fine). Labels are the 1-based classInd indices minus one. The
lists name ``HandstandPushups/v_HandStandPushups_*``; any listed path that does not exist exactly is resolved
case-insensitively (and, failing that, by its stem with any video extension, so a dataset re-encoded to
``.mp4`` also loads) through one index of the root built up front. Group: ``<Class>_gGG``, the source video.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.data.annotations.base import (
    Dataset,
    DatasetError,
    MissingSplitFile,
    read_class_ind,
    read_lines,
    ucf_group,
)
from pipeline.data.annotations.official import Entry, OfficialFormat, SplitLists, class_lookup, load_official

__all__ = ["UCF101", "load_ucf101"]


def _entries(lists: dict[str, Path], classes: list[str], class_ind: Path):
    lookup = class_lookup(classes)
    for subset, list_path in lists.items():
        for n, line in read_lines(list_path):
            parts = line.split()
            listed = parts[0]
            folder = listed.split("/", 1)[0] if "/" in listed else ""
            label = lookup.get(folder, lookup.get(folder.lower()))
            if len(parts) > 2 or label is None:
                raise DatasetError(
                    f"{list_path}:{n}: expected '<Class>/<video>' with a class from {class_ind}, got {line!r}"
                )
            if len(parts) == 2 and parts[1] != str(label + 1):
                raise DatasetError(
                    f"{list_path}:{n}: label {parts[1]} does not match class {classes[label]} "
                    f"({label + 1} in {class_ind})"
                )
            yield Entry(list_path, n, listed, listed, label, subset)


def _read(splits_dir: Path, split: int) -> SplitLists:
    class_ind = splits_dir / "classInd.txt"
    lists = {"train": splits_dir / f"trainlist{split:02d}.txt", "test": splits_dir / f"testlist{split:02d}.txt"}
    for path in (class_ind, *lists.values()):
        if not path.is_file():
            raise MissingSplitFile(f"UCF101 split file not found: {path}")
    classes = read_class_ind(class_ind)
    return SplitLists(classes, class_ind, f"{lists['train'].name} / {lists['test'].name} in {splits_dir}",
                      _entries(lists, classes, class_ind))


UCF101 = OfficialFormat("ucf101", "UCF101", "ucfTrainTestlist", _read, lambda stem, _: ucf_group(stem))


def load_ucf101(
    root: str | os.PathLike,
    *,
    splits_dir: str | os.PathLike | None = None,
    split: int = 1,
    allow_missing: bool = False,
    index=None,
) -> Dataset:
    """UCF101 with its official split ``split`` (1, 2 or 3).

    ``splits_dir`` holds ``classInd.txt``, ``trainlist0N.txt`` and ``testlist0N.txt``; by default
    ``<root>/ucfTrainTestlist`` when present, else ``root``. Videos on disk that the split's lists do not name
    are ``"unused"``; missing videos and ``index`` as in :func:`~pipeline.data.annotations.official.load_official`.
    """
    return load_official(UCF101, root, splits_dir=splits_dir, split=split, allow_missing=allow_missing, index=index)
