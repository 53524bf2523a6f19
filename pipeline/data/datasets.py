"""Datasets on disk -> a sorted list of videos with labels, split membership and groups.

Five layouts ([STFN], Sec. 4.1 evaluates on the three official splits of UCF101 and HMDB51):

``ucf101``
    ``<root>/<Class>/v_<Class>_gGG_cCC.avi`` with the official ``classInd.txt``,
    ``trainlist0{1,2,3}.txt`` and ``testlist0{1,2,3}.txt`` (CRLF line endings are fine).
    Labels are the 1-based classInd indices minus one. The lists name
    ``HandstandPushups/v_HandStandPushups_*``; any listed path that does not exist exactly is
    resolved case-insensitively (and, failing that, by its stem with any video extension, so a
    dataset re-encoded to ``.mp4`` also loads) through one index of the root built up front.
``hmdb51``
    ``<root>/<class>/<clip>.avi`` with the official ``<class>_test_split{1,2,3}.txt`` files
    (tag 1 = train, 2 = test, 0 = unused). Class order: TSN's ``class_list.txt``
    (``pyActionRecog/benchmark_db.py``) when the splits folder has one, otherwise the sorted
    class names, as mmaction2 does. The two orders differ only by two swaps: TSN's list puts
    ``kick_ball`` before ``kick`` and ``sword_exercise`` before ``sword``.
``folder``
    ``<root>/<Class>/**/<name>.{avi,mp4,mkv,webm,mov}``, classes sorted; all videos are train
    unless ``test_fraction`` is given, in which case whole groups go to test
    (:func:`pipeline.data.splits.holdout_groups`, deterministic for a seed).
``csv``
    ``path,label[,split[,group]]`` rows with an optional header (see :func:`load_csv`).
``demo``
    the CSV layout read from ``<root>/list.csv`` (written by the demo generator).

Video ids: the video's path relative to the dataset root (the CSV's folder for ``csv`` and
``demo``) without its extension, with ``/`` separators, e.g.
``ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01``. An absolute CSV path outside that folder gives
its absolute path without the leading ``/`` and extension. Ids are unique within a dataset,
never empty, contain no ``.``/``..`` component, backslash or control character, and are
stable across runs as long as the files do not move.

Groups (for group-held-out validation, so that clips cut from one source video never sit on
both sides of a split):

* UCF-style names ``v_<X>_gGG_cCC`` give ``<X>_gGG`` (UCF101 and folder layouts): the 25
  groups of a UCF101 class are the source videos its clips were cut from.
* HMDB51 names ``<title>_<action>_<body>_<camera>_<people>_<view>_<quality>_<idx>`` give
  ``<title>``, the source video's title, shared across classes: one film (e.g.
  ``TheBoondockSaints``) supplies clips to up to 18 classes, so grouping by title alone keeps
  its actors and scenes on one side. The official splits already keep each title on one side
  within a class.
* Otherwise the CSV's ``group`` column, else the video id (each video its own group).
"""

from __future__ import annotations

import csv as _csv
import difflib
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

from pipeline.data.splits import holdout_groups

__all__ = [
    "DATASET_KINDS",
    "LABEL_KINDS",
    "SPLITS",
    "VIDEO_EXTENSIONS",
    "Dataset",
    "DatasetError",
    "MissingSplitFile",
    "VideoRecord",
    "hmdb_group",
    "load_csv",
    "load_dataset",
    "load_folder",
    "load_hmdb51",
    "load_ucf101",
    "ucf_group",
]

DATASET_KINDS = ("ucf101", "hmdb51", "folder", "csv", "demo")
LABEL_KINDS = ("names", "indices")  # what a CSV's label column holds
SPLITS = ("train", "test", "unused")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov")
OFFICIAL_SPLITS = (1, 2, 3)  # [STFN], Sec. 4.1: "three training and testing splits"

_MAX_LISTED = 10
_UCF_NAME = re.compile(r"^v_(?P<name>.+)_g(?P<group>\d+)_c(?P<clip>\d+)$")
_HMDB_TAGS = {"0": "unused", "1": "train", "2": "test"}
_INT = re.compile(r"[+-]?\d+")
log = logging.getLogger("pipeline")


class DatasetError(ValueError):
    """A dataset on disk, its split files or its list is missing or inconsistent."""


class MissingSplitFile(DatasetError):
    """A split file the requested official split needs is absent (the message names its path)."""


@dataclass(frozen=True)
class VideoRecord:
    """One video of a dataset.

    ``video_id`` is the path relative to the dataset root without extension (module docstring).
    """

    video_id: str
    path: Path
    label: int
    class_name: str
    split: str
    group: str


@dataclass(frozen=True)
class Dataset:
    """A labelled, split list of videos, ``videos`` sorted by ``video_id``."""

    name: str
    root: Path
    classes: tuple[str, ...]
    videos: tuple[VideoRecord, ...]
    split_id: int | None
    missing: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def counts(self) -> dict[str, int]:
        """Number of videos per split: ``{"train": .., "test": .., "unused": ..}``."""
        counts = dict.fromkeys(SPLITS, 0)
        for video in self.videos:
            counts[video.split] += 1
        return counts

    def subset(self, split: str) -> tuple[VideoRecord, ...]:
        """The videos of one split (``"train"``, ``"test"`` or ``"unused"``), in id order."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        return tuple(v for v in self.videos if v.split == split)


# ----------------------------------------------------------------------------- groups


def ucf_group(stem: str) -> str | None:
    """``"v_ApplyEyeMakeup_g01_c01"`` -> ``"ApplyEyeMakeup_g01"``; ``None`` for other names."""
    match = _UCF_NAME.match(stem)
    if match is None:
        return None
    return f"{match['name']}_g{match['group']}"


def hmdb_group(stem: str, class_name: str) -> str | None:
    """Source title of an HMDB51 clip name, ``None`` when the name does not follow the pattern.

    ``"April_09_brush_hair_u_nm_np1_ba_goo_0"`` (class ``brush_hair``) -> ``"April_09"``: drop the
    six trailing meta fields (body, camera motion, people, viewpoint, quality, clip index) and
    the action name before them.
    """
    head = stem.split("_")
    if len(head) <= 6:
        return None
    head = "_".join(head[:-6])
    suffix = "_" + class_name
    if not head.endswith(suffix) or len(head) == len(suffix):
        return None
    return head[: -len(suffix)]


# ----------------------------------------------------------------------------- helpers


def _abs(path: str | os.PathLike) -> Path:
    """Absolute path without resolving symlinks (keeps the user's view of the tree)."""
    return Path(os.path.abspath(os.fspath(path)))


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{what} {path} does not exist or is not a folder")


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist")


def _check_split_id(split: int) -> int:
    if isinstance(split, bool) or not isinstance(split, int) or split not in OFFICIAL_SPLITS:
        raise DatasetError(f"split must be one of 1, 2, 3 (the official splits), got {split!r}")
    return split


def _is_video(name: str) -> bool:
    # Hidden files are skipped: macOS copies leave "._<name>.avi" AppleDouble files beside videos.
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def _video_id(rel: str) -> str:
    """``"Class/v_x.avi"`` -> ``"Class/v_x"``, checking the id is safe to use as a store key."""
    stem = os.path.splitext(rel)[0]
    parts = stem.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in stem or any(ord(c) < 32 for c in stem):
        raise DatasetError(
            f"cannot make a video id from path {rel!r} (empty, '.', '..', backslash or control character)"
        )
    return stem


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of non-blank lines; handles CRLF and a BOM."""
    with open(path, encoding="utf-8-sig", newline=None) as f:
        return [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _handle_missing(missing: list[str], allow_missing: bool, root: Path, source: str) -> tuple[str, ...]:
    if missing and not allow_missing:
        raise DatasetError(
            f"{len(missing)} videos named in {source} are missing under {root}: {_listing(missing)}; "
            "allow missing videos (--allow-missing, or allow_missing=True) to go on without them"
        )
    return tuple(missing)


def _finish(
    name: str,
    root: Path,
    classes: Sequence[str],
    records: list[VideoRecord],
    split_id: int | None,
    missing: tuple[str, ...],
) -> Dataset:
    if not records:
        raise DatasetError(f"dataset {name!r} at {root} has no videos (extensions: {', '.join(VIDEO_EXTENSIONS)})")
    records.sort(key=lambda r: r.video_id)
    dups = sorted({a.video_id for a, b in zip(records, records[1:]) if a.video_id == b.video_id})
    if dups:
        paths = [str(r.path) for r in records if r.video_id in set(dups[:_MAX_LISTED])]
        raise DatasetError(
            f"dataset {name!r} at {root}: {len(dups)} duplicate video ids: {_listing(dups)} (paths: {_listing(paths)})"
        )
    return Dataset(name, root, tuple(classes), tuple(records), split_id, missing)


class _DiskIndex:
    """The videos at ``<root>/<folder>/<file>``, scanned once, for exact and case-insensitive lookup."""

    def __init__(self, root: Path):
        self.root = root
        self.files: set[str] = set()
        self.lower: dict[str, str] = {}
        self.stems: dict[str, list[str]] = defaultdict(list)
        with os.scandir(root) as top:
            folders = [e.name for e in top if e.is_dir() and not e.name.startswith(".")]
        for folder in folders:
            with os.scandir(root / folder) as entries:
                for entry in entries:
                    if _is_video(entry.name) and entry.is_file():
                        rel = f"{folder}/{entry.name}"
                        self.files.add(rel)
                        self.lower[rel.lower()] = rel
                        self.stems[os.path.splitext(rel)[0].lower()].append(rel)

    def resolve(self, rel: str) -> str | None:
        """The on-disk relative path for a listed one: exact, then case-insensitive, then by stem."""
        if rel in self.files:
            return rel
        found = self.lower.get(rel.lower())
        if found is not None:
            return found
        candidates = self.stems.get(os.path.splitext(rel)[0].lower(), [])
        return candidates[0] if len(candidates) == 1 else None


def _class_lookup(classes: Sequence[str]) -> dict[str, int]:
    """Class name -> index, with lower-case aliases for case-insensitive folder names."""
    lookup = {name.lower(): i for i, name in enumerate(classes)}
    lookup.update({name: i for i, name in enumerate(classes)})
    return lookup


def _unused_records(
    index: _DiskIndex, used: set[str], lookup: dict[str, int], classes: Sequence[str], source: Path, group_of
) -> list[VideoRecord]:
    """Videos on disk that the split lists do not name."""
    records, strays = [], defaultdict(int)
    for rel in sorted(index.files - used):
        folder = rel.split("/", 1)[0]
        label = lookup.get(folder, lookup.get(folder.lower()))
        if label is None:
            strays[folder] += 1
            continue
        vid = _video_id(rel)
        stem = vid.rsplit("/", 1)[-1]
        records.append(
            VideoRecord(vid, index.root / rel, label, classes[label], "unused", group_of(stem, classes[label]) or vid)
        )
    if strays:
        listed = [f"{folder} ({n} videos)" for folder, n in sorted(strays.items())]
        raise DatasetError(
            f"folders under {index.root} hold videos but are not classes in {source}: {_listing(listed)}"
        )
    return records


def _default_splits_dir(root: Path, candidates: Sequence[str]) -> Path:
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    return root


# ----------------------------------------------------------------------------- UCF101


def _read_class_ind(path: Path) -> list[str]:
    entries = []
    for n, line in _read_lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise DatasetError(f"{path}:{n}: expected '<index> <ClassName>', got {line!r}")
        entries.append((int(parts[0]), parts[1]))
    indices = sorted(i for i, _ in entries)
    if indices != list(range(1, len(entries) + 1)):
        raise DatasetError(f"{path}: class indices must be 1..{len(entries)} without gaps or repeats")
    return [name for _, name in sorted(entries)]


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
    ``<root>/ucfTrainTestlist`` when present, else ``root``. Videos on disk that the split's
    lists do not name are ``"unused"``. Listed videos missing on disk raise a
    :class:`DatasetError` unless ``allow_missing``, in which case they are dropped and recorded
    in ``Dataset.missing`` (as listed, without the label column). ``index`` replaces the scan of the root
    for video files (an object like ``_DiskIndex``: ``root``, ``files``, ``resolve``); the rawframes import
    passes one over frame folders (:mod:`pipeline.interop.rawframes`).
    """
    root = _abs(root)
    _require_dir(root, "UCF101 root")
    split = _check_split_id(split)
    splits_dir = _default_splits_dir(root, ["ucfTrainTestlist"]) if splits_dir is None else _abs(splits_dir)
    _require_dir(splits_dir, "UCF101 splits folder")
    class_ind = splits_dir / "classInd.txt"
    lists = {"train": splits_dir / f"trainlist{split:02d}.txt", "test": splits_dir / f"testlist{split:02d}.txt"}
    for path in (class_ind, *lists.values()):
        if not path.is_file():
            raise MissingSplitFile(f"UCF101 split file not found: {path}")

    classes = _read_class_ind(class_ind)
    lookup = _class_lookup(classes)
    index = _DiskIndex(root) if index is None else index
    records, missing, used = [], [], set()
    for subset, list_path in lists.items():
        for n, line in _read_lines(list_path):
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
            rel = index.resolve(listed)
            if rel is None:
                missing.append(listed)
                continue
            if rel in used:
                raise DatasetError(f"{list_path}:{n}: {listed} is listed twice in split {split}")
            used.add(rel)
            vid = _video_id(rel)
            stem = vid.rsplit("/", 1)[-1]
            records.append(VideoRecord(vid, root / rel, label, classes[label], subset, ucf_group(stem) or vid))
    source = f"{lists['train'].name} / {lists['test'].name} in {splits_dir}"
    missing_t = _handle_missing(missing, allow_missing, root, source)
    records += _unused_records(index, used, lookup, classes, class_ind, lambda stem, _: ucf_group(stem))
    return _finish("ucf101", root, classes, records, split, missing_t)


# ----------------------------------------------------------------------------- HMDB51


def load_hmdb51(
    root: str | os.PathLike,
    *,
    splits_dir: str | os.PathLike | None = None,
    split: int = 1,
    allow_missing: bool = False,
    index=None,
) -> Dataset:
    """HMDB51 with its official split ``split`` (1, 2 or 3).

    ``splits_dir`` holds ``<class>_test_split{1,2,3}.txt`` (and optionally TSN's
    ``class_list.txt``, whose order then gives the labels; else class names are sorted); by
    default ``<root>/testTrainMulti_7030_splits`` when present, else
    ``root``. Tags: 1 train, 2 test, 0 unused; videos on disk named by no split file are
    ``"unused"`` too. Missing videos as in :func:`load_ucf101`.
    """
    root = _abs(root)
    _require_dir(root, "HMDB51 root")
    split = _check_split_id(split)
    splits_dir = _default_splits_dir(root, ["testTrainMulti_7030_splits"]) if splits_dir is None else _abs(splits_dir)
    _require_dir(splits_dir, "HMDB51 splits folder")
    suffix = f"_test_split{split}.txt"
    split_files = sorted(p for p in splits_dir.iterdir() if p.name.endswith(suffix) and len(p.name) > len(suffix))
    if not split_files:
        raise MissingSplitFile(f"HMDB51 split files not found: no {splits_dir}/<class>{suffix}")
    classes = sorted(p.name[: -len(suffix)] for p in split_files)
    class_list = splits_dir / "class_list.txt"
    if class_list.is_file():
        listed = [line for _, line in _read_lines(class_list)]
        if sorted(listed) != sorted(classes):
            extra, absent = sorted(set(listed) - set(classes)), sorted(set(classes) - set(listed))
            raise DatasetError(
                f"{class_list} does not match the {suffix} files: only in the list: {_listing(extra) or '-'}; "
                f"only as split files: {_listing(absent) or '-'}"
            )
        classes = listed

    lookup = _class_lookup(classes)
    index = _DiskIndex(root) if index is None else index
    records, missing, used = [], [], set()
    for label, class_name in enumerate(classes):
        list_path = splits_dir / f"{class_name}{suffix}"
        for n, line in _read_lines(list_path):
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or parts[1] not in _HMDB_TAGS:
                raise DatasetError(f"{list_path}:{n}: expected '<video>.avi <0|1|2>', got {line!r}")
            listed = f"{class_name}/{parts[0]}"
            rel = index.resolve(listed)
            if rel is None:
                missing.append(listed)
                continue
            if rel in used:
                raise DatasetError(f"{list_path}:{n}: {parts[0]} is listed twice in split {split}")
            used.add(rel)
            vid = _video_id(rel)
            stem = vid.rsplit("/", 1)[-1]
            group = hmdb_group(stem, class_name) or vid
            records.append(VideoRecord(vid, root / rel, label, class_name, _HMDB_TAGS[parts[1]], group))
    missing_t = _handle_missing(missing, allow_missing, root, f"{splits_dir}/<class>{suffix}")
    records += _unused_records(index, used, lookup, classes, splits_dir, hmdb_group)
    return _finish("hmdb51", root, classes, records, split, missing_t)


# ----------------------------------------------------------------------------- folder per class


def load_folder(
    root: str | os.PathLike, *, test_fraction: float | None = None, seed: int = 0
) -> Dataset:
    """``<root>/<Class>/**/<video>`` with classes sorted by name.

    All videos are ``"train"`` when ``test_fraction`` is None or 0; otherwise whole groups
    (UCF-style ``_gNN_`` names, else one group per video) are moved to ``"test"`` by
    :func:`holdout_groups` with ``seed``.
    """
    root = _abs(root)
    _require_dir(root, "dataset root")
    if test_fraction is not None and not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in [0, 1), got {test_fraction}")
    with os.scandir(root) as top:
        folders = sorted(e.name for e in top if e.is_dir() and not e.name.startswith("."))
    found: list[tuple[str, str]] = []  # (class, relative path)
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(root / folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            found += [(folder, f"{rel_dir}/{name}") for name in filenames if _is_video(name)]
    classes = sorted({c for c, _ in found})
    label_of = {c: i for i, c in enumerate(classes)}
    records = []
    for class_name, rel in found:
        vid = _video_id(rel)
        group = ucf_group(vid.rsplit("/", 1)[-1]) or vid
        records.append(VideoRecord(vid, root / rel, label_of[class_name], class_name, "train", group))
    if test_fraction:
        held = holdout_groups(records, test_fraction, seed=seed)
        records = [
            VideoRecord(r.video_id, r.path, r.label, r.class_name, "test", r.group) if r.group in held else r
            for r in records
        ]
    return _finish("folder", root, classes, records, None, ())


# ----------------------------------------------------------------------------- CSV list

_CSV_COLUMNS = ("path", "label", "split", "group")


def _read_classes_file(path: Path) -> list[str]:
    """Class names in index order: one name per line, or UCF101's ``classInd.txt`` lines ``<1-based index> <name>``."""
    lines = [line for _, line in _read_lines(path)]
    if lines and all(re.fullmatch(r"\d+\s+\S+", line) for line in lines):
        return _read_class_ind(path)
    dups = sorted({n for n in lines if lines.count(n) > 1})
    if dups:
        raise DatasetError(f"{path}: class names repeated: {_listing(dups)}")
    return lines


def _csv_header(csv_path: Path, first: list[str]) -> list[str] | None:
    """The column names when ``first`` is a header row, None when it is a data row.

    A row is a header when it names a known column and its first cell is not a video file; every cell must
    then be a known column, ``path`` and ``label`` once each.
    """
    cells = [c.lower() for c in first]
    if not set(cells) & set(_CSV_COLUMNS) or _is_video(os.path.basename(first[0])):
        return None
    unknown = [c for c in first if c.lower() not in _CSV_COLUMNS]
    if unknown:
        close = difflib.get_close_matches(unknown[0].lower(), _CSV_COLUMNS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetError(f"{csv_path}:1: unknown column {unknown[0]!r} in the header{hint}; "
                           f"known columns: {', '.join(_CSV_COLUMNS)}")
    if "path" not in cells or "label" not in cells or len(set(cells)) != len(cells):
        raise DatasetError(f"{csv_path}:1: header must name 'path' and 'label' once each, got {first}")
    return cells


def _integer_classes(csv_path: Path, labels: Sequence[str]) -> list[str]:
    """Classes ``"0".."C-1"`` for integer labels that are exactly 0..C-1; an error naming gaps or negatives."""
    values = sorted({int(t) for t in labels})
    negative = [v for v in values if v < 0]
    if negative:
        raise DatasetError(f"{csv_path}: negative class indices {_listing([str(v) for v in negative])}; labels "
                           "are 0-based indices or class names, or give a class list (--classes)")
    gaps = sorted(set(range(values[-1] + 1)) - set(values)) if values else []
    if gaps:
        raise DatasetError(f"{csv_path}: integer labels {_listing([str(v) for v in values])} leave classes "
                           f"{_listing([str(v) for v in gaps])} without any video; give a class list (--classes) "
                           "that names every class, or use class names as labels")
    return [str(v) for v in values]


def _warn_singletons(csv_path: Path, classes: Sequence[str], labels: Sequence[int]) -> None:
    """A class with one video among classes with several is most likely a label typo: name it."""
    counts = [0] * len(classes)
    for label in labels:
        counts[label] += 1
    if len(classes) < 2 or sorted(counts)[len(counts) // 2] < 3:
        return
    for i, n in enumerate(counts):
        if n == 1:
            others = [c for j, c in enumerate(classes) if j != i]
            close = difflib.get_close_matches(classes[i], others, n=1)
            hint = f"; a typo of {close[0]!r}?" if close else ""
            log.warning("%s: class %r has a single video%s (give a class list, --classes, to make unknown labels "
                        "an error)", csv_path, classes[i], hint)


def load_csv(
    csv: str | os.PathLike,
    *,
    classes_file: str | os.PathLike | None = None,
    labels: str = "names",
    allow_missing: bool = False,
    name: str = "csv",
) -> Dataset:
    """A list ``path,label[,split[,group]]``, one video per row.

    * Header: the first row is a header when it names one of ``path, label, split, group`` and its
      first cell is not a video file; it must then name only those (any order, ``path`` and ``label``
      required), else a :class:`DatasetError` names the unknown column. Without one, columns are positional.
    * ``path``: relative to the CSV's folder (the dataset root) or absolute.
    * ``label``: with ``labels="names"`` (default) a class name; with ``labels="indices"`` a 0-based class
      index. With ``classes_file`` (one class name per line in index order, or ``classInd.txt``'s
      ``<1-based index> <name>`` lines) a label must be one of its names or an index into it. Without it,
      classes are the sorted unique names; labels that all look like integers must be exactly 0..C-1
      (classes ``"0".."C-1"``): gaps or negatives are an error. A class with a single video among classes
      with several is logged as a likely typo.
    * ``split``: ``train`` (the default when empty or absent), ``test`` or ``unused``.
    * ``group``: when empty or absent, derived from a UCF-style name, else the video id.
    """
    if labels not in LABEL_KINDS:
        raise DatasetError(f"labels must be one of {', '.join(LABEL_KINDS)}, got {labels!r}")
    csv_path = _abs(csv)
    _require_file(csv_path, "video list")
    if classes_file is not None:
        classes_file = _abs(classes_file)
        _require_file(classes_file, "classes file")
    root = csv_path.parent

    with open(csv_path, encoding="utf-8-sig", newline="") as f:
        rows = [(n, [c.strip() for c in row]) for n, row in enumerate(_csv.reader(f), start=1)]
    rows = [(n, row) for n, row in rows if any(row)]
    columns = {c: i for i, c in enumerate(_CSV_COLUMNS)}
    header = _csv_header(csv_path, rows[0][1]) if rows else None
    if header is not None:
        columns = {c: i for i, c in enumerate(header)}
        rows = rows[1:]

    parsed = []  # (line, rel or absolute path, label text, split, group text)
    for n, row in rows:
        if len(row) < 2 or len(row) > len(columns):
            raise DatasetError(f"{csv_path}:{n}: expected columns {','.join(columns)}, got {len(row)} values")
        cell = {c: (row[i] if i < len(row) else "") for c, i in columns.items()}
        split = cell.get("split", "").lower() or "train"
        if split not in SPLITS:
            raise DatasetError(f"{csv_path}:{n}: unknown split {cell['split']!r}; valid splits: {', '.join(SPLITS)}")
        if not cell["path"] or not cell["label"]:
            raise DatasetError(f"{csv_path}:{n}: empty path or label")
        if labels == "indices" and not _INT.fullmatch(cell["label"]):
            raise DatasetError(f"{csv_path}:{n}: label {cell['label']!r} is not a class index (labels=indices)")
        parsed.append((n, cell["path"], cell["label"], split, cell.get("group", "")))

    texts = [p[2] for p in parsed]
    integer = bool(texts) and all(_INT.fullmatch(t) for t in texts)
    if classes_file is not None:
        classes = _read_classes_file(classes_file)
    elif integer:
        classes = _integer_classes(csv_path, texts)
    else:
        classes = sorted(set(texts))
    by_name = {} if labels == "indices" else {c: i for i, c in enumerate(classes)}

    records, missing = [], []
    for n, path_text, label_text, split, group in parsed:
        label = by_name.get(label_text)
        if label is None and _INT.fullmatch(label_text) and (integer or classes_file is not None):
            label = int(label_text) if 0 <= int(label_text) < len(classes) else None
        if label is None:
            where = f"classes in {classes_file}" if classes_file is not None else "classes"
            raise DatasetError(f"{csv_path}:{n}: unknown label {label_text!r} ({len(classes)} {where})")
        path = _abs(root / path_text)  # an absolute path_text replaces root
        if not path.is_file():
            missing.append(path_text)
            continue
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if rel.startswith("../"):
            rel = path.as_posix().lstrip("/")
        vid = _video_id(rel)
        group = group or ucf_group(PurePosixPath(vid).name) or vid
        records.append(VideoRecord(vid, path, label, classes[label], split, group))
    if classes_file is None and not integer:
        _warn_singletons(csv_path, classes, [r.label for r in records])
    missing_t = _handle_missing(missing, allow_missing, root, str(csv_path))
    return _finish(name, root, classes, records, None, missing_t)


# ----------------------------------------------------------------------------- entry point


def load_dataset(
    kind: str,
    root: str | os.PathLike,
    *,
    splits_dir: str | os.PathLike | None = None,
    split: int = 1,
    csv: str | os.PathLike | None = None,
    classes_file: str | os.PathLike | None = None,
    labels: str | None = None,
    test_fraction: float | None = None,
    seed: int = 0,
    allow_missing: bool = False,
) -> Dataset:
    """Load a dataset of layout ``kind`` (one of :data:`DATASET_KINDS`).

    ``splits_dir`` and ``split`` apply to ``ucf101``/``hmdb51``; ``csv`` (default
    ``<root>/list.csv``; a relative path is taken from the current directory, like any
    command-line path), ``classes_file`` and ``labels`` to ``csv``; ``test_fraction`` and ``seed`` to
    ``folder``; ``allow_missing`` to all but ``folder``. An option given for a layout that does
    not use it is an error rather than silently ignored.
    """
    if kind not in DATASET_KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(DATASET_KINDS)}")
    given = {
        "splits_dir": splits_dir is not None,
        "csv": csv is not None,
        "classes_file": classes_file is not None,
        "labels": labels is not None,
        "test_fraction": test_fraction is not None,
        "seed": seed != 0,
        "allow_missing": allow_missing,
    }
    uses = {
        "ucf101": {"splits_dir", "allow_missing"},
        "hmdb51": {"splits_dir", "allow_missing"},
        "folder": {"test_fraction", "seed"},
        "csv": {"csv", "classes_file", "labels", "allow_missing"},
        "demo": {"allow_missing"},
    }[kind]
    unused = sorted(k for k, v in given.items() if v and k not in uses)
    if unused:
        raise DatasetError(f"option(s) {', '.join(unused)} do not apply to dataset kind {kind!r}")

    if kind == "ucf101":
        return load_ucf101(root, splits_dir=splits_dir, split=split, allow_missing=allow_missing)
    if kind == "hmdb51":
        return load_hmdb51(root, splits_dir=splits_dir, split=split, allow_missing=allow_missing)
    if kind == "folder":
        return load_folder(root, test_fraction=test_fraction, seed=seed)
    root_path = _abs(root)
    _require_dir(root_path, "dataset root")
    if kind == "demo":
        return load_csv(root_path / "list.csv", allow_missing=allow_missing, name="demo")
    return load_csv(root_path / "list.csv" if csv is None else csv, classes_file=classes_file,
                    labels=labels or "names", allow_missing=allow_missing)
